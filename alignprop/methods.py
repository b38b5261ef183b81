"""The direct reward fine-tuning family as settings of one sampling loop (`config.train.method`).

Each method only chooses where gradients flow through the chain (REFERENCE_METHODS.md §0: which denoiser
calls keep gradients, whether the denoiser's input is detached, what the reward sees), drawn once per rollout:

- `alignprop` (Prabhudesai et al. 2023): the last K steps keep gradients, K fixed or drawn once per rollout
  (`train.truncation`: fixed, uniform, gaussian); the reward sees the decoded sample.
- `draft_k` (Clark et al. 2023, DRaFT-K): the last `train.k` steps, K fixed: exactly AlignProp's `fixed` mode.
- `draft_lv` (DRaFT-LV): the whole rollout without gradients to x, then `train.lv_copies` = n copies of x
  forward-diffused to the noise level of the last step with fresh noise, and that last step re-run on each,
  with gradients; the reward sees the n decoded one-step samples (n times the images; the loss averages them).
- `refl` (Xu et al. 2023, ImageReward's ReFL): no gradients down to a step s drawn uniformly from the last
  `train.stop_last` steps, s with gradients on a z_s that carries no graph, and the reward on the clean sample
  predicted at s, decoded; the steps after s never run. (The paper's pretraining-loss regularizer is out of scope.)
- `drtune` (Wu et al. 2024, DRTune): the gradient stops at the denoiser's input of every step, so earlier steps
  are reached through the updates' skip terms only; `train.drtune_k` evenly spaced steps (random offset) of
  0..s keep gradients, s drawn from the last `train.stop_last` steps; the reward on the clean sample at s.

Every method can add DRaFT+'s prediction-distance penalty (`train.kl_coeff`): the squared distance between the
fine-tuned and the base model's predictions on the same inputs at the grad steps (the base model is the LoRA
switched off), averaged, times the coefficient, added to the loss.
"""

import dataclasses

import torch

from alignprop import truncation

METHODS = ("alignprop", "draft_k", "draft_lv", "refl", "drtune")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Where one rollout's gradients flow (drawn once per rollout)."""

    grad_steps: tuple
    stop: int = None  # the reward sees the clean sample predicted at this step (ReFL, DRTune)
    detach_input: bool = False  # DRTune
    copies: int = 0  # DRaFT-LV: re-noised copies of the last step

    @property
    def k(self):
        """The number of denoiser calls with gradients (logged as `k_mean`)."""
        return self.copies or len(self.grad_steps)


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    num_steps: int
    truncation: truncation.Truncation
    lv_copies: int = 2
    stop_last: int = 10
    drtune_k: int = 3

    @classmethod
    def from_config(cls, config):
        t = config.train
        return cls(t.method, config.sample.num_steps, truncation.Truncation.from_config(config), t.lv_copies,
                   t.stop_last, t.drtune_k)

    @property
    def max_grad_calls(self):
        """The most denoiser calls with gradients one rollout makes (AlignProp's largest K; DRaFT-LV's one last step,
        on its n copies)."""
        if self.name in ("alignprop", "draft_k"):
            return self.truncation.largest
        return self.drtune_k if self.name == "drtune" else 1

    def draw(self, generator):
        """This rollout's Plan, from `generator` (a CPU torch.Generator): one draw per rollout."""
        steps = self.num_steps
        if self.name in ("alignprop", "draft_k"):
            k = self.truncation.draw(generator)
            return Plan(tuple(range(steps - k, steps)))
        if self.name == "draft_lv":
            return Plan((), copies=self.lv_copies)
        stop = int(torch.randint(steps - self.stop_last, steps, (), generator=generator))
        if self.name == "refl":
            return Plan((stop,), stop=stop)
        # DRTune: k steps of 0..stop, evenly spaced with stride (stop + 1) // k, from a random offset.
        k = min(self.drtune_k, stop + 1)
        stride = (stop + 1) // k
        offset = int(torch.randint(0, stride, (), generator=generator))
        return Plan(tuple(offset + j * stride for j in range(k)), stop=stop, detach_input=True)


def images(rollout, cond, latents, plan, generator=None, penalty=None):
    """The images the reward sees under `plan` ([B, ...], or [copies x B, ...] for DRaFT-LV, copy-major); the
    steps without gradients may run float8 matmuls (`config.speed.fp8_prefix`)."""
    with rollout.prepared.sampling_prefix():
        return _images(rollout, cond, latents, plan, generator, penalty)


def _images(rollout, cond, latents, plan, generator, penalty):
    if not plan.copies:
        out = rollout.latents(cond, latents, plan.grad_steps, generator, stop=plan.stop,
                              detach_input=plan.detach_input, penalty=penalty)
        return rollout.decode(out)
    # DRaFT-LV (Clark et al. 2023, Sec. 4.2): x without gradients, then n one-step samples from re-noised x.
    last = len(rollout.schedule) - 1
    with torch.no_grad():
        clean = rollout.latents(cond, latents, (), generator)
    noisy = torch.cat([rollout.schedule.renoise(last, clean, torch.randn(clean.shape, generator=generator,
                                                                         device=clean.device, dtype=clean.dtype))
                       for _ in range(plan.copies)])
    repeated = {k: v if k in rollout.family.unbatched else _repeat(v, plan.copies) for k, v in cond.items()}
    out = rollout.latents(repeated, noisy, (last,), generator, start=last, penalty=penalty)
    return rollout.decode(out)


def _repeat(value, n):
    return {k: _repeat(v, n) for k, v in value.items()} if isinstance(value, dict) else torch.cat([value] * n)


def problems(config):
    """Start-up checks of the method keys of `config.train`."""
    t, steps = config.train, config.sample.num_steps
    if t.method not in METHODS:
        return [f"config.train.method={t.method!r}: must be one of {', '.join(METHODS)}"]
    out = []
    if t.method == "draft_k" and t.truncation != "fixed":
        out.append(f"config.train.truncation={t.truncation!r}: DRaFT-K is fixed truncation (config.train.k); set "
                   f"config.train.truncation='fixed', or config.train.method='alignprop' for a random K")
    if t.method in ("alignprop", "draft_k"):
        out.extend(truncation.problems(config))
    if t.method == "draft_lv" and not (isinstance(t.lv_copies, int) and t.lv_copies >= 1):
        out.append(f"config.train.lv_copies={t.lv_copies!r}: must be an int >= 1 (the paper's n = 2)")
    if t.method in ("refl", "drtune") and not 1 <= t.stop_last <= steps:
        out.append(f"config.train.stop_last={t.stop_last!r}: must be in [1, sample.num_steps={steps}]")
    if t.method == "drtune" and t.drtune_k < 1:
        out.append(f"config.train.drtune_k={t.drtune_k!r}: must be >= 1")
    if not t.kl_coeff >= 0:
        out.append(f"config.train.kl_coeff={t.kl_coeff!r}: must be >= 0 (0: no penalty)")
    return out
