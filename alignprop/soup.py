"""Soup evaluation: one reward column per component of `config.reward_fn`, the coefficient table and its plot."""

import math

from alignprop.rewards import parse_reward_spec

# Column of a weighted sum's total (the components follow it, under their reward names).
TOTAL = "total"


def reward_columns(spec):
    """`"aesthetic"` -> ["aesthetic"]; `"aesthetic:1,hps:20"` -> ["total", "aesthetic", "hps"]."""
    names = [name for name, _ in parse_reward_spec(spec)]
    # make_reward_fn returns a plain reward for a lone name, and a weighted sum (with components in info) otherwise.
    return names if len(names) == 1 and ":" not in spec else [TOTAL, *names]


def columns_reward_fn(reward_fn, columns):
    """A reward_fn whose rewards are [B, R], one column per entry of `columns` (what `evaluate` passes through).

    The components come from the weighted sum's info (each component's reward under its name), so every
    scorer runs once per batch.
    """

    import torch

    def fn(images, prompts, metadata):
        rewards, info = reward_fn(images, prompts, metadata)
        if columns[0] != TOTAL:
            return rewards[:, None], info
        return torch.stack([rewards, *(info[name] for name in columns[1:])], dim=1), info

    return fn


def summarize(rewards, columns):
    """[N, R] rewards -> {column: {"mean", "std"}} (std 0 for a single sample)."""
    out = {}
    for j, name in enumerate(columns):
        values = rewards[:, j].double()
        std = values.std().item() if len(values) > 1 else 0.0
        out[name] = {"mean": values.mean().item(), "std": std}
    return out


def parse_coefficients(texts):
    """['0', '0.5'] -> [0.0, 0.5]; a ValueError naming the flag for anything that is not a finite number."""
    try:
        values = [float(t) for t in texts]
    except ValueError:
        values = [math.nan]
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f"--coefficients={','.join(texts)!r} must be a comma-separated list of numbers, e.g. 0,0.5,1.")
    return values


def plot_soup(rows, columns, path, xlabel):
    """PNG plot of reward mean ± std against the mixing coefficient, one panel per reward column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    order = sorted(range(len(rows)), key=lambda i: rows[i]["coefficient"])
    c = np.array([rows[i]["coefficient"] for i in order])
    fig, axes = plt.subplots(1, len(columns), figsize=(4.5 * len(columns), 3.6), dpi=100, squeeze=False)
    for ax, name in zip(axes[0], columns):
        mean = np.array([rows[i]["rewards"][name]["mean"] for i in order])
        std = np.array([rows[i]["rewards"][name]["std"] for i in order])
        ax.plot(c, mean, marker="o")
        ax.fill_between(c, mean - std, mean + std, alpha=0.25)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{name} (mean ± std)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
