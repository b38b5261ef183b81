"""How many of the last denoising steps keep gradients (K), drawn once per rollout (`config.train.truncation`).

Modes: `fixed` (K given; DRaFT-K, AlignProp's K=1 low-memory mode), `uniform` (K ~ U[k_min, k_max], the
paper's randomized truncation), `gaussian` (the cut point ~ N(cut_mean, cut_std), as the official code's
later version; K = T - round(cut), clipped to [k_min, k_max]).
Never drawn per step: drawing inside the loop (official v1, TRL) scatters gradients over ~T/2 random steps.
"""

import dataclasses

import torch

MODES = ("fixed", "uniform", "gaussian")


@dataclasses.dataclass(frozen=True)
class Truncation:
    mode: str
    num_steps: int
    k: int = 1
    k_min: int = 1
    k_max: int = None
    cut_mean: float = None
    cut_std: float = None

    @classmethod
    def from_config(cls, config):
        t = config.train
        return cls(t.truncation, config.sample.num_steps, t.k, t.k_min, t.k_max, t.cut_mean, t.cut_std)

    @property
    def largest(self):
        """The largest K a draw can give."""
        return int(self.k) if self.mode == "fixed" else self.num_steps if self.k_max is None else self.k_max

    def draw(self, generator):
        """K in [1, num_steps] for one rollout, from `generator` (a CPU torch.Generator)."""
        k_max = self.largest
        if self.mode == "fixed":
            return int(self.k)
        if self.mode == "uniform":
            return int(torch.randint(self.k_min, k_max + 1, (), generator=generator))
        if self.mode == "gaussian":
            cut = self.cut_mean + self.cut_std * float(torch.randn((), generator=generator))
            return int(min(max(self.num_steps - round(cut), self.k_min), k_max))
        raise ValueError(f"unknown truncation mode {self.mode!r}; valid: {', '.join(MODES)}")


def problems(config):
    """Start-up checks of the truncation keys of `config.train`."""
    t, steps = config.train, config.sample.num_steps
    if t.truncation not in MODES:
        return [f"config.train.truncation={t.truncation!r}: must be one of {', '.join(MODES)}"]
    if t.truncation == "fixed" and not 1 <= t.k <= steps:
        return [f"config.train.k={t.k!r}: must be in [1, sample.num_steps={steps}]"]
    out = []
    if t.truncation != "fixed" and not 1 <= t.k_min <= t.k_max <= steps:
        out.append(f"config.train.k_min={t.k_min!r}, config.train.k_max={t.k_max!r}: need "
                   f"1 <= k_min <= k_max <= sample.num_steps={steps}")
    if t.truncation == "gaussian":
        if t.cut_std < 0:
            out.append(f"config.train.cut_std={t.cut_std!r}: must be >= 0")
        elif (
            steps - round(t.cut_mean + 3 * t.cut_std) >= t.k_max or steps - round(t.cut_mean - 3 * t.cut_std) <= t.k_min
        ):
            # Nearly every draw is clipped to one bound: K would be the same on every step.
            bound = "k_max" if steps - round(t.cut_mean + 3 * t.cut_std) >= t.k_max else "k_min"
            out.append(
                f"config.train.cut_mean={t.cut_mean!r}, config.train.cut_std={t.cut_std!r}: K = num_steps - cut "
                f"is clipped to {bound} on almost every draw (cut point outside [{steps - t.k_max}, "
                f"{steps - t.k_min}]); put cut_mean inside it, or use truncation='fixed'"
            )
    return out
