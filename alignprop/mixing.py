"""Using trained LoRAs: mixing in weight-delta space ("model soup"), the soup evaluation, and image generation
through the family's own diffusers pipeline (users get exactly what diffusers gives).

A LoRA changes a weight by ΔW = (alpha / rank)·B·A. Mixing must interpolate these deltas: with
`set_adapters(names, weights)` every adapted layer computes W·x + Σᵢ wᵢ·ΔWᵢ·x, so weights [c] give c·ΔW
(the base model mixed with one LoRA at c, i.e. the LoRA's scale at inference) and [c, 1−c] give
c·ΔW_A + (1−c)·ΔW_B. Interpolating the A and B factors separately (the official AlignProp code) gives
c²·ΔW and cross terms B₁A₂, B₂A₁ between two LoRAs instead (REFERENCE.md, bug #5).
"""

import math
import os

import torch

from alignprop import lora
from alignprop.errors import ConfigError

# Adapter names of a two-LoRA soup (`soup_weights` gives their weights).
SOUP_ADAPTERS = ("lora_a", "lora_b")


def parse_lora_spec(spec):
    """'PATH:WEIGHT' -> (PATH, WEIGHT); 'PATH' alone -> (PATH, 1.0)."""
    path, sep, weight_text = spec.rpartition(":")
    if not sep:
        return spec, 1.0
    try:
        weight = float(weight_text)
    except ValueError:
        if path and os.path.exists(path) and not os.path.exists(spec):
            raise ConfigError(f"--lora={spec!r}: the weight {weight_text!r} must be a number "
                              f"(e.g. '{path}:0.5').") from None
        return spec, 1.0  # a colon inside the path, no weight
    if not math.isfinite(weight):
        raise ConfigError(f"--lora={spec!r}: the weight {weight_text!r} must be a finite number (e.g. '{path}:0.5').")
    if not path:
        raise ConfigError(f"--lora={spec!r} names no path; write PATH or PATH:WEIGHT.")
    return path, weight


def set_mix(denoiser, adapter_names, weights):
    """Activate `adapter_names` with `weights`: every adapted layer uses W + Σᵢ wᵢ·ΔWᵢ (ΔW-space mixing)."""
    if len(adapter_names) != len(weights):
        raise ValueError(f"{len(adapter_names)} adapters {adapter_names} but {len(weights)} weights {weights}.")
    denoiser.set_adapters(list(adapter_names), weights=[float(w) for w in weights])


def load_mix(denoiser, family, specs):
    """Load `[(path, weight), ...]` as adapters lora_0, lora_1, ... and mix them; returns [(name, file, weight)]."""
    loaded = []
    for i, (path, weight) in enumerate(specs):
        name = f"lora_{i}"
        loaded.append((name, lora.load_adapter(denoiser, family, path, name), weight))
    if loaded:
        set_mix(denoiser, [name for name, _, _ in loaded], [weight for _, _, weight in loaded])
    return loaded


def soup_weights(coefficient, two_loras):
    """Adapter weights of a soup at `coefficient` c: [c] (LoRA A with the base model), or [c, 1 − c] (A with B).

    c is the weight of LoRA A; the other end (LoRA B, or the base model) gets 1 − c, so c = 0 is LoRA B
    (or the base model) and c = 1 is LoRA A.
    """
    c = float(coefficient)
    return [c, 1.0 - c] if two_loras else [c]


def load_soup(denoiser, family, files):
    """Load LoRA A (and B) into the denoiser as adapters `lora_a` (`lora_b`); returns the adapter names."""
    names = list(SOUP_ADAPTERS[: len(files)])
    for name, file in zip(names, files):
        lora.load_adapter(denoiser, family, file, name)
    return names


def evaluate_soup(denoiser, names, coefficients, evaluate_fn):
    """Yield (coefficient, adapter weights, *evaluate_fn()) per coefficient: c·ΔW_A + (1 − c)·ΔW_B (or base)."""
    for c in coefficients:
        weights = soup_weights(c, two_loras=len(names) == 2)
        set_mix(denoiser, names, weights)
        yield (c, dict(zip(names, weights)), *evaluate_fn())


def parse_coefficients(texts):
    """['0', '0.5'] -> [0.0, 0.5]; a ConfigError naming the flag for anything that is not a finite number."""
    try:
        values = [float(t) for t in texts]
    except ValueError:
        values = [math.nan]
    if not values or not all(math.isfinite(v) for v in values):
        raise ConfigError(
            f"--coefficients={','.join(texts)!r} must be a comma-separated list of numbers, e.g. 0,0.5,1."
        )
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


def image_generators(seed, start, count):
    """One CPU generator per image, seeded `seed + index`: image i is the same whatever the batch size or device."""
    return [torch.Generator().manual_seed(seed + i) for i in range(start, start + count)]


@torch.no_grad()
def generate(pipe, prompts, seed, num_steps, guidance_scale, batch_size, height=None, width=None):
    """Images [N, H, W, 3] (numpy float in [0, 1]) for `prompts`, in order; image i uses seed `seed + i`."""
    import numpy as np

    images = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        out = pipe(
            batch,
            height=height,
            width=width,
            num_inference_steps=num_steps,
            guidance_scale=guidance_scale,
            generator=image_generators(seed, start, len(batch)),
            output_type="np",
        )
        images.append(out.images)
    return np.concatenate(images)


def export_fused(pipe, family, out_dir):
    """Merge the active LoRA adapters (at their mixing weights) into the denoiser and save a plain pipeline.

    The folder loads with `<family pipeline>.from_pretrained(out_dir)` and needs no LoRA code.
    """
    if pipe.get_active_adapters():
        pipe.fuse_lora(components=[family.denoiser_name])
        pipe.unload_lora_weights()  # drops the adapter modules; the fused weights stay
    pipe.save_pretrained(out_dir)
