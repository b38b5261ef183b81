"""The differentiable sampling loop and the schedules it steps: tensors and callables in, latents out.

One loop serves training (gradients through the chosen denoiser calls), evaluation (no gradients) and
every method that changes which steps keep gradients. It knows nothing of prompts, models, accelerators
or speed: the caller hands it ready-made denoisers (see `alignprop.rollout` and `alignprop.speed`).
"""

import torch


class DDIMSchedule:
    """DDIM (Song et al. 2021) on a copy of the checkpoint's scheduler config: epsilon or v-prediction.

    `step` is diffusers' `DDIMScheduler.step` (stateless, differentiable in the model output and the
    sample; it follows the config's `prediction_type`). Timesteps are Python ints for the scheduler,
    which indexes a CPU `alphas_cumprod` with them (a device tensor would cost a sync per step), and
    0-d device tensors made once for the denoiser (no host-device copy per call; a compiled denoiser sees
    a tensor, not a new constant per step).
    """

    def __init__(self, scheduler_config, num_steps, eta=0.0, device=None):
        from diffusers import DDIMScheduler

        self.scheduler = DDIMScheduler.from_config(scheduler_config)
        self.scheduler.set_timesteps(num_steps)
        self.timesteps = [int(t) for t in self.scheduler.timesteps]
        self.model_timesteps = [torch.tensor(t, dtype=torch.int64, device=device) for t in self.timesteps]
        self.eta = eta

    def __len__(self):
        return len(self.timesteps)

    def step(self, i, model_output, latents, generator=None):
        """Latents after step `i`. With eta > 0 the step's noise is drawn from `generator` at every step,
        with or without gradients, so the draws do not depend on which steps keep gradients."""
        noise = None
        if self.eta > 0:
            noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        return self.scheduler.step(
            model_output, self.timesteps[i], latents, eta=self.eta, variance_noise=noise
        ).prev_sample

    def pred_x0(self, i, model_output, latents):
        """The one-step prediction of the clean sample at step `i` (the "posterior mean": epsilon or v, as
        the config says), differentiable in both inputs."""
        return self.scheduler.step(model_output, self.timesteps[i], latents, eta=0.0).pred_original_sample

    def renoise(self, i, clean, noise):
        """`clean` forward-diffused to the noise level of step `i`: sqrt(a) x0 + sqrt(1 - a) noise."""
        alpha = self.scheduler.alphas_cumprod[self.timesteps[i]].to(clean.device, clean.dtype)
        return alpha.sqrt() * clean + (1 - alpha).sqrt() * noise


class FlowMatchSchedule:
    """The flow-matching Euler sampler (Esser et al. 2024, SD3; FLUX.1) of a `FlowMatchEulerDiscreteScheduler` config.

    The sigmas and timesteps are the scheduler's own after `set_timesteps(num_steps, sigmas=, mu=)` as the
    family's pipeline calls it (static shift, or the resolution-dependent `mu`); `step` is its Euler update
    x + (σ[i+1] − σ[i])·v, computed as `FlowMatchEulerDiscreteScheduler.step` computes it (in fp32 from the
    sample, then cast back to the model output's dtype), without its step counter: stateless, so replays
    under checkpoint recomputation and concurrent rollouts are safe, and with no host-device sync (the
    scheduler looks its index up with `.nonzero().item()` on SD3's first step).
    """

    def __init__(self, scheduler_config, num_steps, device=None, sigmas=None, mu=None):
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        if scheduler.config.stochastic_sampling:
            raise ValueError("FlowMatchSchedule: stochastic_sampling=True in the scheduler config is not supported")
        if sigmas is None:
            scheduler.set_timesteps(num_steps, device=device, mu=mu)
        else:  # as diffusers' retrieve_timesteps passes custom sigmas (FLUX)
            scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
        self.sigmas = scheduler.sigmas  # [T + 1] fp32 on `device`, ending at 0
        self.timesteps = scheduler.timesteps.tolist()  # σ·1000 as floats (logs, tests)
        self.model_timesteps = list(scheduler.timesteps)  # 0-d fp32 device tensors, as the pipelines iterate them
        # σ[i+1] − σ[i] as the scheduler's step computes it: a 0-d fp32 tensor on the device.
        self.dts = [self.sigmas[i + 1] - self.sigmas[i] for i in range(len(self.model_timesteps))]

    def __len__(self):
        return len(self.model_timesteps)

    def step(self, i, model_output, latents, generator=None):
        """Latents after step `i` (deterministic: `generator` is unused)."""
        return (latents.to(torch.float32) + self.dts[i] * model_output).to(model_output.dtype)

    def pred_x0(self, i, model_output, latents):
        """The clean sample predicted at step `i`: x_σ = (1 − σ)·x0 + σ·noise and v = noise − x0 give x0 = x − σ·v."""
        return (latents.to(torch.float32) - self.sigmas[i] * model_output).to(model_output.dtype)

    def renoise(self, i, clean, noise):
        """`clean` moved to the noise level of step `i`: (1 − σ)·x0 + σ·noise."""
        sigma = self.sigmas[i].to(clean.dtype)
        return (1 - sigma) * clean + sigma * noise


def sample(schedule, latents, nograd_denoise, grad_denoise, grad_steps=(), generator=None, callback=None,
           start=0, stop=None, detach_input=False):
    """Run the steps `start`.. of `schedule` from `latents`; the denoiser outputs of the steps in `grad_steps`
    keep gradients. Returns the final latents, or, with `stop`, the clean sample predicted at step `stop`
    (the later steps never run).

    `nograd_denoise(latents, i)` runs the other steps under no_grad (no graph, no checkpoint overhead):
    truncated backprop (AlignProp, Prabhudesai et al. 2023, Sec. 4) is `grad_steps = range(T - K, T)`.
    `grad_denoise(latents, i)` runs with gradients (the caller decides checkpointing). The update itself
    is always differentiable in the latents; `detach_input` stops the gradient at the denoiser's input of
    every grad step (DRTune, Wu et al. 2024), so earlier steps are reached through the updates' skip terms
    only. `callback(i, latents)` runs after each step.
    """
    grad_steps = set(grad_steps)
    for i in range(start, len(schedule) if stop is None else stop + 1):
        if i in grad_steps:
            output = grad_denoise(latents.detach() if detach_input else latents, i)
        else:
            with torch.no_grad():
                output = nograd_denoise(latents, i)
        if i == stop:
            return schedule.pred_x0(i, output, latents)
        latents = schedule.step(i, output, latents, generator)
        if callback is not None:
            callback(i, latents)
    return latents
