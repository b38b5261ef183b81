"""The differentiable DDIM sampler: tensors and callables in, latents (or [0, 1] images) out.

One loop serves training (gradients through the last K UNet calls), evaluation (no gradients) and
every variant that changes which steps get gradients.
"""

import contextlib
import dataclasses
import functools

import torch
from torch.autograd.profiler import record_function
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint


def guided_unet(unet, prompt_embeds, negative_prompt_embeds, guidance_scale):
    """A denoise function `(latents, t) -> noise_pred` with classifier-free guidance (Ho & Salimans 2022).

    Conditional and unconditional predictions come from one batched UNet call, ordered [uncond, cond]
    as in diffusers' pipelines. With guidance_scale <= 1 (or no negative embeddings) only the conditional
    branch runs.
    """
    do_cfg = guidance_scale > 1.0 and negative_prompt_embeds is not None
    embeds = torch.cat([negative_prompt_embeds, prompt_embeds]) if do_cfg else prompt_embeds

    def denoise(latents, t):
        model_input = torch.cat([latents, latents]) if do_cfg else latents
        timestep = timestep_tensor(t, latents.device)
        noise_pred = unet(model_input, timestep, encoder_hidden_states=embeds, return_dict=False)[0]
        if not do_cfg:
            return noise_pred
        noise_uncond, noise_cond = noise_pred.chunk(2)
        return noise_uncond + guidance_scale * (noise_cond - noise_uncond)

    return denoise


def is_compiled(module):
    """Whether `module` (or the module DDP wraps), or a block inside it, runs through torch.compile."""
    module = getattr(module, "module", module)
    return isinstance(module, torch._dynamo.eval_frame.OptimizedModule) or any(
        getattr(m, "_compiled_call_impl", None) is not None for m in module.modules()
    )


@functools.lru_cache(maxsize=4096)
def timestep_tensor(t, device):
    """The int timestep `t` as a 0-d int64 tensor on `device`, made once and reused.

    The UNet then gets the same value diffusers would build from the int, without a host-to-device copy
    per call, and a compiled UNet sees a tensor input instead of specializing on (and recompiling for)
    each int.
    """
    return torch.tensor(int(t), dtype=torch.int64, device=device)


def ddim_timesteps(scheduler, num_steps):
    """Set the scheduler to `num_steps` and return its timesteps as Python ints.

    Ints, not a tensor: the scheduler indexes a CPU `alphas_cumprod` with them, and a CUDA timestep would
    cost a host-device sync per step.
    """
    scheduler.set_timesteps(num_steps)
    return [int(t) for t in scheduler.timesteps]


def ddim_rollout(
    denoise_fn,
    scheduler,
    latents,
    timesteps,
    grad_steps=0,
    eta=0.0,
    generator=None,
    checkpoint_grad_steps=True,
    nograd_denoise_fn=None,
    progress=False,
    uncheckpointed_steps=0,
    compiled=False,
):
    """DDIM sampling (Song et al. 2021) where only the last `grad_steps` UNet outputs keep gradients.

    Truncated backprop (AlignProp, Prabhudesai et al. 2023, Sec. 4): steps 0..T-K-1 run under no_grad
    (no graph, no checkpoint overhead; `nograd_denoise_fn`, if given, is a cheaper denoiser for them),
    steps T-K..T-1 record a graph, each UNet call optionally checkpointed except the last
    `uncheckpointed_steps` (their activations are kept: less compute, more memory). With eta > 0 the
    noise of every step is drawn from `generator`, so the draws do not depend on K. `compiled` says the
    denoisers run through torch.compile (then the merged-LoRA weights are not cached across steps).
    """
    num_steps = len(timesteps)
    if not 0 <= grad_steps <= num_steps:
        raise ValueError(f"grad_steps={grad_steps} must be in [0, {num_steps}]")
    cut = num_steps - grad_steps
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, desc="DDIM steps", leave=False)

    def step(noise_pred, t, latents):
        variance_noise = None
        if eta > 0:
            variance_noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        if progress:
            bar.update(1)
        return scheduler.step(noise_pred, t, latents, eta=eta, variance_noise=variance_noise).prev_sample

    # cached(): parametrized weights (the merged LoRA) are computed once for the whole no-grad prefix.
    # Not for compiled code, which computes them inside its graph (and would recompile on the cache).
    cache = contextlib.nullcontext() if compiled else parametrize.cached()
    with torch.no_grad(), cache, record_function("alignprop.nograd_steps"):
        for t in timesteps[:cut]:
            latents = step((nograd_denoise_fn or denoise_fn)(latents, t), t, latents)
    if compiled and grad_steps and torch.is_grad_enabled():
        # Every grad step then sees a latent that requires grad (as all but the first do anyway): one
        # compiled graph for all of them instead of two. Costs one small input gradient.
        latents = latents.detach().requires_grad_()
    last_checkpointed = num_steps - min(uncheckpointed_steps, grad_steps)
    with record_function("alignprop.grad_steps"):
        for i, t in enumerate(timesteps[cut:], start=cut):
            if checkpoint_grad_steps and i < last_checkpointed and torch.is_grad_enabled():
                noise_pred = checkpoint(denoise_fn, latents, t, use_reentrant=False)
            else:
                noise_pred = denoise_fn(latents, t)
            latents = step(noise_pred, t, latents)
    if progress:
        bar.close()
    return latents


def decode_latents(vae, latents, batch_size=None, checkpoint_decode=False):
    """VAE decode to images in [0, 1]: the one place where the [-1, 1] -> [0, 1] mapping happens.

    `batch_size` decodes in chunks; with `checkpoint_decode` each chunk's decoder activations are
    recomputed in backward instead of stored, so the decoder's memory is that of one chunk.
    """
    latents = latents / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        latents = latents + shift
    latents = latents.to(vae.dtype)

    def decode(z):
        return vae.decode(z, return_dict=False)[0]

    chunks = latents.split(batch_size or len(latents))
    with record_function("alignprop.decode"):
        if checkpoint_decode and torch.is_grad_enabled():
            images = torch.cat([checkpoint(decode, z, use_reentrant=False) for z in chunks])
        else:
            images = torch.cat([decode(z) for z in chunks])
    return (images / 2 + 0.5).clamp(0, 1)


def initial_latents(batch_size, shape, generator, device, dtype=torch.float32, init_noise_sigma=1.0):
    """x_T ~ N(0, I) drawn from an explicit generator (its device decides where it is drawn)."""
    latents = torch.randn((batch_size, *shape), generator=generator, device=generator.device, dtype=dtype)
    return latents.to(device) * init_noise_sigma


@dataclasses.dataclass
class SamplingSpec:
    """What a rollout needs besides tensors: DDIM steps, guidance, eta, image size, checkpointing."""

    num_steps: int
    guidance_scale: float
    eta: float
    height: int = None
    width: int = None
    checkpoint_grad_steps: bool = True
    decode_batch_size: int = None
    checkpoint_decode: bool = False
    uncheckpointed_steps: int = 0  # the last this many grad steps keep their activations (no checkpoint)
    progress: bool = False  # a progress bar over the DDIM steps of each rollout


def sample_images(
    unet, vae, scheduler, prompt_embeds, negative_prompt_embeds, latents, spec, grad_steps, generator, nograd_unet=None
):
    """Roll out DDIM from `latents` and decode to [0, 1] images; the last `grad_steps` UNet calls keep grads.

    `nograd_unet` (default `unet`) runs the steps without gradients: under DDP, the unwrapped module.
    """
    timesteps = ddim_timesteps(scheduler, spec.num_steps)
    denoise = guided_unet(unet, prompt_embeds, negative_prompt_embeds, spec.guidance_scale)
    if nograd_unet is not None:
        nograd_denoise = guided_unet(nograd_unet, prompt_embeds, negative_prompt_embeds, spec.guidance_scale)
    latents = ddim_rollout(
        denoise,
        scheduler,
        latents,
        timesteps,
        grad_steps=grad_steps,
        eta=spec.eta,
        generator=generator,
        checkpoint_grad_steps=spec.checkpoint_grad_steps,
        nograd_denoise_fn=None if nograd_unet is None else nograd_denoise,
        progress=spec.progress,
        uncheckpointed_steps=spec.uncheckpointed_steps,
        compiled=is_compiled(nograd_unet if nograd_unet is not None else unet),
    )
    return decode_latents(vae, latents, spec.decode_batch_size, spec.checkpoint_decode)
