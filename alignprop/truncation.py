"""How many of the last denoising steps keep gradients (K), drawn once per rollout.

Modes: `fixed` (K given; DRaFT-K, AlignProp's K=1 low-memory mode), `uniform` (K ~ U[k_min, k_max], the
paper's randomized truncation), `gaussian` (the cut point ~ N(cut_mean, cut_std), as the official code's
later version; K = T - round(cut), clipped to [k_min, k_max]).
Never drawn per step: drawing inside the loop (official v1, TRL) scatters gradients over ~T/2 random steps.
"""

import torch

MODES = ("fixed", "uniform", "gaussian")


def draw_grad_steps(mode, num_steps, generator, k=1, k_min=1, k_max=None, cut_mean=None, cut_std=None):
    """Draw K in [1, num_steps] for one rollout from `generator` (a CPU torch.Generator)."""
    k_max = num_steps if k_max is None else k_max
    if mode == "fixed":
        return int(k)
    if mode == "uniform":
        return int(torch.randint(k_min, k_max + 1, (), generator=generator))
    if mode == "gaussian":
        cut = cut_mean + cut_std * float(torch.randn((), generator=generator))
        return int(min(max(num_steps - round(cut), k_min), k_max))
    raise ValueError(f"unknown truncation mode {mode!r}; valid: {', '.join(MODES)}")
