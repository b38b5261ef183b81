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


def sample(schedule, latents, nograd_denoise, grad_denoise, grad_steps=(), generator=None, callback=None):
    """Run every step of `schedule` from `latents`; the denoiser outputs of the steps in `grad_steps` keep gradients.

    `nograd_denoise(latents, i)` runs the other steps under no_grad (no graph, no checkpoint overhead):
    truncated backprop (AlignProp, Prabhudesai et al. 2023, Sec. 4) is `grad_steps = range(T - K, T)`.
    `grad_denoise(latents, i)` runs with gradients (the caller decides checkpointing). The update itself
    is always differentiable in the latents. `callback(i, latents)` runs after each step.
    """
    grad_steps = set(grad_steps)
    for i in range(len(schedule)):
        if i in grad_steps:
            output = grad_denoise(latents, i)
        else:
            with torch.no_grad():
                output = nograd_denoise(latents, i)
        latents = schedule.step(i, output, latents, generator)
        if callback is not None:
            callback(i, latents)
    return latents
