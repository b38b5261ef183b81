"""Soup evaluation: LoRA A mixed with LoRA B or the base model over coefficients, reward columns, table and plot."""

import math

from alignprop import mixing

def load_soup(unet, files):
    """Load LoRA A (and B) into the UNet as adapters `lora_a` (`lora_b`); returns the adapter names."""
    names = list(mixing.SOUP_ADAPTERS[: len(files)])
    for name, file in zip(names, files):
        mixing.load_lora(unet, file, name)
    return names


def evaluate_soup(unet, names, coefficients, evaluate_fn):
    """Yield (coefficient, adapter weights, *evaluate_fn()) per coefficient: c·ΔW_A + (1 − c)·ΔW_B (or base)."""
    for c in coefficients:
        weights = mixing.soup_weights(c, two_loras=len(names) == 2)
        mixing.set_mix(unet, names, weights)
        yield (c, dict(zip(names, weights)), *evaluate_fn())


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
