"""A rollout: prompts -> conditioning -> initial noise -> the sampling loop -> [0, 1] images, for one model.

Built once (family, components, sampling settings, the speed layer's prepared callables) and shared by
training, evaluation, the soup evaluation and the benchmark.
"""

import dataclasses
import functools

import torch
from torch.autograd.profiler import record_function

from alignprop import sampling
from alignprop.families.base import expand_cond


@dataclasses.dataclass(frozen=True)
class SampleSpec:
    """How images are sampled (`config.sample`): steps, guidance, eta, image size."""

    num_steps: int
    guidance_scale: float
    guidance_rescale: float = 0.0
    eta: float = 0.0
    height: int = None  # None: the model's native size
    width: int = None

    @classmethod
    def from_config(cls, sample):
        return cls(sample.num_steps, sample.guidance_scale, sample.guidance_rescale, sample.eta, sample.height,
                   sample.width)


class Rollout:
    """One model's sampler. `train_denoiser` runs the steps with gradients (the module that
    `accelerator.prepare` returned, so that DDP syncs the LoRA gradients); the prepared denoiser runs the
    steps without (no DDP hooks needed there)."""

    def __init__(self, family, components, spec, prepared, train_denoiser=None, progress=False):
        self.family, self.components, self.spec, self.prepared = family, components, spec, prepared
        self.train_denoiser = train_denoiser if train_denoiser is not None else prepared.denoiser
        self.device = next(components.denoiser.parameters()).device
        self.height, self.width = family.image_size(components, spec.height, spec.width)
        family.check_size(components, self.height, self.width)
        self.latent_shape = family.latent_shape(components, self.height, self.width)
        self.schedule = family.schedule(components, spec, self.device)
        self.negative = family.negative(components, (self.height, self.width))  # batch 1, computed once
        self.progress = progress

    def encode(self, prompts):
        """The denoiser's conditioning of `prompts` (no gradients)."""
        return self.family.encode(self.components, prompts, (self.height, self.width))

    def initial_latents(self, batch, generator):
        return self.family.initial_latents(self.components, batch, self.latent_shape, generator, self.device)

    def __call__(self, cond, latents, grad_steps=(), generator=None):
        """Images [B, 3, H, W] in [0, 1] from x_T `latents`; the denoiser outputs of `grad_steps` keep gradients.

        `generator` draws the per-step noise (eta > 0).
        """
        return self.decode(self.latents(cond, latents, grad_steps, generator))

    def guided(self, module, cond, batch):
        """(latents, timestep) -> `module`'s guided prediction for `cond` of `batch` samples (the family's CFG with
        the negative conditioning, or its own guidance)."""
        negative = None if self.negative is None else expand_cond(self.negative, batch)
        call = functools.partial(self.family.denoiser_call, module)
        return self.family.guided_denoiser(self.components, call, cond, negative, self.spec)

    def latents(self, cond, latents, grad_steps=(), generator=None, start=0, stop=None, detach_input=False,
                penalty=None):
        """The sampling loop from `latents` at step `start` (see `sampling.sample` for `stop`, `detach_input`).

        `penalty`, a list: each grad step appends the per-sample mean squared distance between its prediction and
        the base model's on the same input (the LoRA switched off, no gradient; DRaFT+'s KL-style penalty).
        """
        timesteps = self.schedule.model_timesteps

        def denoiser(module, label):
            guided = self.guided(module, cond, len(latents))

            def denoise(x, i):
                with record_function(label):
                    return guided(x, timesteps[i])

            return denoise

        nograd = denoiser(self.prepared.denoiser, "alignprop.denoise")
        grad = self.prepared.grad_denoise(denoiser(self.train_denoiser, "alignprop.denoise_grad"), len(self.schedule))
        if penalty is not None:
            grad = self._with_penalty(grad, nograd, penalty)
        bar = self._progress_bar()
        latents = sampling.sample(
            self.schedule, latents, nograd, grad, grad_steps=grad_steps, generator=generator, start=start, stop=stop,
            detach_input=detach_input, callback=bar and (lambda i, x: bar.update(1)),
        )
        if bar:
            bar.close()
        return latents

    def _with_penalty(self, grad, nograd, penalty):
        from alignprop.kernels import lora_disabled

        def denoise(x, i):
            out = grad(x, i)
            with torch.no_grad(), lora_disabled(self.prepared.denoiser), self.prepared.exact():
                base = nograd(x, i)
            penalty.append((out.float() - base.float()).pow(2).flatten(1).mean(1))
            return out

        return denoise

    def decode(self, latents):
        """[0, 1] images of final (or predicted clean) latents."""
        images = self.prepared.decode(self.family.vae_input(self.components, latents, (self.height, self.width)))
        return (images / 2 + 0.5).clamp(0, 1)  # the one place where the VAE's [-1, 1] becomes [0, 1]

    def _progress_bar(self):
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=len(self.schedule), desc="denoising steps", leave=False)


def grad_suffix(num_steps, k):
    """The steps whose outputs keep gradients under truncated backprop to the last `k` steps."""
    if not 0 <= k <= num_steps:
        raise ValueError(f"K={k} must be in [0, {num_steps}]")
    return range(num_steps - k, num_steps)


