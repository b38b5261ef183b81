"""One AlignProp optimizer step: prompts -> rollout with truncated backprop -> reward -> loss -> update."""

import dataclasses
import time

import torch
from torch.autograd.profiler import record_function
from torch.utils.checkpoint import checkpoint

from alignprop.models import encode_prompts, latent_shape
from alignprop.rewards import reward_loss
from alignprop.sampling import SamplingSpec, initial_latents, sample_images
from alignprop.truncation import draw_grad_steps


def build_optimizer(params, train):
    """AdamW over the LoRA parameters (8-bit from bitsandbytes if `train.use_8bit_adam`)."""
    if train.use_8bit_adam:
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit
    else:
        cls = torch.optim.AdamW
    return cls(
        params,
        lr=train.learning_rate,
        betas=(train.adam_beta1, train.adam_beta2),
        weight_decay=train.adam_weight_decay,
        eps=train.adam_epsilon,
    )


@dataclasses.dataclass
class TrainContext:
    """Everything a training step uses, built once at start-up."""

    accelerator: object
    unet: torch.nn.Module  # as returned by accelerator.prepare (DDP-wrapped on several GPUs)
    components: object
    reward_fn: object
    prompt_set: object
    optimizer: object
    params: list
    spec: SamplingSpec
    train: object  # config.train
    reward_target: float
    accumulation_steps: int
    batch_size: int
    streams: object  # RandomStreams
    negative_prompt_embeds: torch.Tensor  # [1, 77, D], the empty prompt
    nograd_unet: torch.nn.Module = None  # runs the steps before the cut (the raw or compiled UNet)


def micro_batch(ctx):
    """One rollout of `batch_size` samples with gradients; returns (loss, rewards, info, prompts, K, images)."""
    prompts, metadata = zip(*(ctx.prompt_set(ctx.streams.prompts) for _ in range(ctx.batch_size)))
    components = ctx.components
    prompt_embeds = encode_prompts(components.text_encoder, components.tokenizer, prompts)
    negative = ctx.negative_prompt_embeds.expand(len(prompts), -1, -1)
    t = ctx.train
    k = draw_grad_steps(
        t.truncation, ctx.spec.num_steps, ctx.streams.truncation, t.k, t.k_min, t.k_max, t.cut_mean, t.cut_std
    )
    shape = latent_shape(components.unet, components.vae, ctx.spec.height, ctx.spec.width)
    sigma = components.scheduler.init_noise_sigma
    latents = initial_latents(len(prompts), shape, ctx.streams.noise, ctx.accelerator.device, init_noise_sigma=sigma)
    images = sample_images(
        ctx.unet, components.vae, components.scheduler, prompt_embeds, negative, latents, ctx.spec, k,
        ctx.streams.noise, nograd_unet=ctx.nograd_unet,
    )
    with record_function("alignprop.reward"):
        if t.checkpoint_reward:
            rewards, info = checkpoint(ctx.reward_fn, images, list(prompts), list(metadata), use_reentrant=False)
        else:
            rewards, info = ctx.reward_fn(images, list(prompts), list(metadata))
    loss = reward_loss(rewards, ctx.reward_target) * t.loss_coeff
    if torch.is_grad_enabled() and not loss.requires_grad:
        raise RuntimeError(
            "The reward function returned rewards with no gradient w.r.t. the images, so there is nothing to "
            "backpropagate. AlignProp needs a differentiable reward: keep the computation in torch on the "
            "images it is given (no .detach(), .item(), .cpu().numpy(), PIL or torch.no_grad())."
        )
    return loss, rewards.detach(), info, list(prompts), k, images.detach()


def reduce_info(accelerator, infos):
    """Per-sample tensors of the rewards' `info` dicts -> `reward/<key>` means over all processes."""
    out = {}
    for key in infos[0] if infos else ():
        values = torch.cat([torch.as_tensor(info[key]).detach().float().reshape(-1) for info in infos])
        out[f"reward/{key}"] = accelerator.gather(values.to(accelerator.device)).mean().item()
    return out


def lora_in_sync(accelerator, params):
    """Whether the trained parameters are bit-identical on every process (DDP keeps them so)."""
    flat = torch.cat([p.detach().float().flatten() for p in params])
    gathered = accelerator.gather(flat[None])
    return bool((gathered == gathered[0]).all())


def gpu_peaks_gib(accelerator):
    """Each process's peak of allocated GPU memory (GiB, in process order), or None without CUDA."""
    if accelerator.device.type != "cuda":
        return None
    peak = torch.tensor([torch.cuda.max_memory_allocated(accelerator.device) / 2**30], device=accelerator.device)
    return accelerator.gather(peak).tolist()


def gpu_peak_gib(accelerator):
    """The largest peak of allocated GPU memory over the processes (GiB), or None without CUDA."""
    peaks = gpu_peaks_gib(accelerator)
    return None if peaks is None else max(peaks)


def zero_gradient_warning(metrics):
    """What to tell the user when an applied optimizer step had an exactly zero gradient, else None."""
    if metrics["grad_norm"] != 0.0 or metrics["skipped"]:
        return None
    return (
        "the LoRA gradient is exactly zero (the weights moved only by weight decay): the reward does not "
        "change with the images, or its gradient fell below fp16's range (expected with random-weight "
        "rewards at small K). With config.mixed_precision='fp16' try 'bf16' or a larger "
        "config.train.loss_coeff."
    )


def train_step(ctx, keep_samples=False):
    """One optimizer step over `accumulation_steps` micro-batches; returns metrics reduced over processes.

    A non-finite loss on any process, or non-finite gradients without a GradScaler, skips the update
    (gradients dropped, nothing applied); `nonfinite` counts them. fp16 overflow in the gradients is left
    to the GradScaler, which skips the step and lowers its scale (`skipped` = 1, `nonfinite` = 0).
    With `keep_samples`, `metrics["samples"]` holds this process's last micro-batch (images, prompts, rewards).
    """
    accelerator = ctx.accelerator
    start = time.perf_counter()
    losses, all_rewards, ks, prompts, infos = [], [], [], [], []
    nonfinite = torch.zeros((), device=accelerator.device)
    grad_norm = torch.tensor(float("nan"))
    for _ in range(ctx.accumulation_steps):
        with accelerator.accumulate(ctx.unet), accelerator.autocast():
            loss, rewards, info, batch_prompts, k, images = micro_batch(ctx)
            finite = torch.isfinite(loss.detach())
            nonfinite += (~finite).float()
            # Backward even when non-finite: under DDP every rank must join the all-reduce.
            with record_function("alignprop.backward"):
                accelerator.backward(torch.where(finite, loss, torch.zeros_like(loss)))
            if accelerator.sync_gradients:
                nonfinite = accelerator.reduce(nonfinite, reduction="sum")
                if nonfinite.item() == 0:
                    grad_norm = accelerator.clip_grad_norm_(ctx.params, ctx.train.max_grad_norm)
                    # The norm of the synced gradients: every rank takes the same decision. With fp16's
                    # GradScaler an inf norm is its normal signal (it skips the step and lowers the scale).
                    if torch.isfinite(grad_norm) or accelerator.scaler is not None:
                        with record_function("alignprop.optimizer"):
                            ctx.optimizer.step()
                    else:
                        nonfinite += 1
                ctx.optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        all_rewards.append(rewards)
        ks.append(k)
        infos.append(info)
        prompts.extend(batch_prompts)
    rewards = accelerator.gather(torch.cat(all_rewards).float())
    # Mean loss and mean K over all processes, in one reduction.
    k_mean = torch.tensor(sum(ks) / len(ks), device=accelerator.device)
    loss, k_mean = accelerator.reduce(torch.stack([torch.stack(losses).mean().float(), k_mean]), reduction="mean")
    grad_norm = float(grad_norm)
    skipped = nonfinite.item() > 0 or bool(getattr(accelerator, "optimizer_step_was_skipped", False))
    peak = gpu_peak_gib(accelerator)
    if keep_samples:  # a device-to-host copy: only on the steps that log images
        samples = {"images": images.float().cpu(), "prompts": batch_prompts, "rewards": all_rewards[-1].cpu()}
    return {
        **({"samples": samples} if keep_samples else {}),
        **reduce_info(accelerator, infos),
        "loss": loss.item(),
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std().item() if rewards.numel() > 1 else 0.0,
        "k_mean": k_mean.item(),
        "grad_norm": grad_norm,
        "nonfinite": int(nonfinite.item()),
        "skipped": int(skipped),
        "seconds": time.perf_counter() - start,
        **({"gpu_peak_gib": peak} if peak is not None else {}),
        "prompts": prompts,
    }


def sampling_spec(config, progress=False):
    """The rollout settings of a config (shared by training, evaluation and the soup evaluation)."""
    return SamplingSpec(
        progress=progress,
        num_steps=config.sample.num_steps,
        guidance_scale=config.sample.guidance_scale,
        eta=config.sample.eta,
        height=config.sample.height,
        width=config.sample.width,
        checkpoint_grad_steps=config.train.gradient_checkpointing,
        decode_batch_size=config.train.decode_batch_size,
        checkpoint_decode=config.train.checkpoint_decode,
        uncheckpointed_steps=config.train.uncheckpointed_steps,
    )


def make_context(config, accelerator, components, reward_fn, prompt_set, plan):
    """Add LoRA to the (frozen, cast) UNet, build the optimizer, prepare for (multi-)GPU, seed the streams.

    Returns (ctx, lora_config). The forward pass goes through the prepared module, or DDP never syncs
    the LoRA gradients.
    """
    from alignprop.checkpoints import register_hooks
    from alignprop.models import add_lora, compile_models, set_up_forward, trainable_parameters
    from alignprop.rng import LORA_STREAM, RandomStreams, derive_seed, seeded

    # lora_A's initial weights from their own seed (lora_B starts at zero), not from the global RNG.
    with seeded(derive_seed(config.seed, 0, LORA_STREAM), accelerator.device):
        lora_config = add_lora(components.unet, config.lora.rank, config.lora.alpha)
    set_up_forward(components.unet, config.train)
    params = trainable_parameters(components.unet)
    optimizer = build_optimizer(params, config.train)
    unet, optimizer = accelerator.prepare(components.unet, optimizer)
    streams = RandomStreams(config.seed, accelerator.process_index, accelerator.device)
    register_hooks(accelerator, components.unet, lora_config)
    accelerator.register_for_checkpointing(streams)
    spec = sampling_spec(config, progress=config.sample.progress_bar and accelerator.is_main_process)
    ctx = TrainContext(
        accelerator=accelerator,
        unet=unet,
        components=components,
        reward_fn=reward_fn,
        prompt_set=prompt_set,
        optimizer=optimizer,
        params=params,
        spec=spec,
        train=config.train,
        reward_target=config.reward.target,
        accumulation_steps=plan.accumulation_steps,
        batch_size=plan.batch_size_per_gpu,
        streams=streams,
        negative_prompt_embeds=encode_prompts(components.text_encoder, components.tokenizer, [""]),
        nograd_unet=compile_models(components, config.train),
    )
    return ctx, lora_config
