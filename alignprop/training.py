"""One optimizer step: prompts -> rollout with truncated backprop -> reward -> loss -> update."""

import dataclasses
import importlib.util
import logging
import time

import torch
from torch.autograd.profiler import record_function

from alignprop import lora, memory, methods, speed
from alignprop.rewards import reward_loss
from alignprop.rng import LORA_STREAM, RandomStreams, derive_seed, seeded
from alignprop.rollout import Rollout, SampleSpec

logger = logging.getLogger(__name__)


def problems(config):
    """Start-up checks of the optimizer and loss keys of `config.train` (and of `config.lora`)."""
    t = config.train
    out = [
        f"config.train.{key}={t[key]!r}: {why}"
        for key, ok, why in (
            ("learning_rate", t.learning_rate > 0, "must be > 0"),
            ("adam_beta1", 0 <= t.adam_beta1 < 1, "must be in [0, 1)"),
            ("adam_beta2", 0 <= t.adam_beta2 < 1, "must be in [0, 1)"),
            ("adam_weight_decay", t.adam_weight_decay >= 0, "must be >= 0"),
            ("adam_epsilon", t.adam_epsilon > 0, "must be > 0"),
            ("max_grad_norm", t.max_grad_norm > 0, "must be > 0"),
            ("grad_scale_init", t.grad_scale_init > 0, "must be > 0"),
            ("loss_coeff", t.loss_coeff > 0, "must be > 0"),
            ("max_nonfinite_steps", t.max_nonfinite_steps >= 1, "must be >= 1"),
        )
        if not ok
    ]
    if t.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        out.append(
            "config.train.use_8bit_adam=True: needs bitsandbytes (`pip install bitsandbytes`), or set it to False"
        )
    return out + lora.problems(config)


def accelerator_handlers(config):
    """accelerate's kwargs handlers for `config`: DDP without buffer broadcasts, and the fp16 GradScaler's initial
    scale (`train.grad_scale_init`).

    DDP broadcasts the module's buffers from rank 0 at every forward by default: a collective, so a sync, in each of
    the K grad-step calls, of constants every rank already has (the frozen denoiser's; SD3.5 medium's positional
    embedding is 0.45 GB in bf16)."""
    from accelerate.utils import DistributedDataParallelKwargs, GradScalerKwargs

    handlers = [DistributedDataParallelKwargs(broadcast_buffers=False)]
    if config.mixed_precision == "fp16":
        handlers.append(GradScalerKwargs(init_scale=config.train.grad_scale_init))
    return handlers


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
class Trainer:
    """Everything a training step uses, built once at start-up (`make_trainer`)."""

    accelerator: object
    rollout: Rollout  # its grad steps run through the prepared (DDP-wrapped) denoiser
    reward_fn: object  # (images, prompts, metadata) -> (total, components, info), as training calls it
    prompt_set: object
    method: object  # methods.Method: where gradients flow, drawn once per rollout
    optimizer: object
    params: list  # the LoRA parameters (fp32)
    streams: RandomStreams
    batch_size: int  # per micro-batch (per GPU)
    accumulation_steps: int
    loss_coeff: float
    reward_target: float = None
    max_grad_norm: float = 5.0
    kl_coeff: float = 0.0  # DRaFT+'s prediction-distance penalty (0: off)
    memory_plan: object = None  # memory.MemoryPlan chosen from config.speed.memory_budget_gib (None: the config's)


@dataclasses.dataclass
class Samples:
    """What a step leaves besides its metrics: this process's prompts, and its last micro-batch's images."""

    prompts: list
    images: torch.Tensor = None  # [B, 3, H, W] in [0, 1] on the CPU, on the steps that keep them
    image_prompts: list = None
    rewards: torch.Tensor = None


def add_lora(config, family, components, device):
    """The trainable LoRA on the denoiser (lora_A from its own seed; lora_B starts at zero). Returns its config."""
    with seeded(derive_seed(config.seed, 0, LORA_STREAM), device):
        return lora.add_lora(
            components.denoiser, config.lora.rank, config.lora.alpha, config.lora.targets or family.lora_targets
        )


def make_trainer(config, settings, accelerator, components, reward_fn):
    """Add LoRA to the (frozen, cast) denoiser, prepare it for speed, build the optimizer, prepare for
    (multi-)GPU and seed the streams. Returns (trainer, lora_config).

    The grad steps go through the module `accelerator.prepare` returns, or DDP never syncs the LoRA gradients.
    """
    from alignprop import checkpoints

    lora_config = add_lora(config, settings.family, components, accelerator.device)
    prepared = speed.prepare(settings.family, components, config.speed)
    params = lora.trainable_parameters(components.denoiser)
    optimizer = build_optimizer(params, config.train)
    train_denoiser, optimizer = accelerator.prepare(components.denoiser, optimizer)
    streams = RandomStreams(config.seed, accelerator.process_index, accelerator.device)
    checkpoints.register_hooks(accelerator, settings.family, components.denoiser, lora_config)
    accelerator.register_for_checkpointing(streams)
    rollout = Rollout(
        settings.family,
        components,
        SampleSpec.from_config(config.sample),
        prepared,
        train_denoiser,
        progress=config.sample.progress_bar and accelerator.is_main_process,
    )
    precompute_prompts(config, settings, rollout)
    method_reward = speed.reward_call(reward_fn, config.speed)
    items = settings.prompts.items
    memory_plan = memory.plan_memory(
        config, rollout, method_reward, params, [items[i % len(items)] for i in range(settings.plan.batch_size_per_gpu)],
        settings.method, accelerator.autocast)
    trainer = Trainer(
        accelerator=accelerator,
        rollout=rollout,
        reward_fn=method_reward,
        prompt_set=settings.prompts,
        method=settings.method,
        optimizer=optimizer,
        params=params,
        streams=streams,
        batch_size=settings.plan.batch_size_per_gpu,
        accumulation_steps=settings.plan.accumulation_steps,
        loss_coeff=config.train.loss_coeff,
        reward_target=config.reward.target,
        max_grad_norm=config.train.max_grad_norm,
        kl_coeff=config.train.kl_coeff,
        memory_plan=memory_plan,
    )
    return trainer, lora_config


def precompute_prompts(config, settings, rollout):
    """The training set's prompts and the evaluation's, encoded once at start-up where the family caches prompt
    embeddings (SD3, FLUX with `config.model.cache_prompt_embeddings`), so that no step moves or runs the text
    encoders; skipped, with a warning, above `config.model.precompute_prompt_embeddings_max_gib`."""
    from alignprop.evaluation import eval_items

    prompts = [p for p, _ in settings.prompts.items]
    prompts += [p for p, _ in eval_items(settings.eval_prompts, config.sample.num_eval_samples)]
    limit = config.model.precompute_prompt_embeddings_max_gib
    if not limit:
        return
    start = time.perf_counter()
    count, gib = rollout.family.precompute_prompts(rollout.components, prompts, limit)
    unique = len(set(prompts))
    if gib is None:
        logger.warning("prompt embeddings not precomputed: %d prompts would need more than "
                       "config.model.precompute_prompt_embeddings_max_gib=%s GiB of CPU memory; each is encoded "
                       "when first drawn", unique, limit)
    elif count:
        logger.info("encoded %d prompts at start-up in %.1f s (%.2f GiB of CPU memory)", count,
                    time.perf_counter() - start, gib)


@dataclasses.dataclass
class MicroBatch:
    loss: torch.Tensor
    rewards: torch.Tensor  # [B], detached
    components: dict
    info: dict
    prompts: list
    k: int  # denoiser calls with gradients
    images: torch.Tensor  # detached
    kl: torch.Tensor = None  # the prediction-distance penalty (before its coefficient), detached


def micro_batch(trainer):
    """One rollout of `batch_size` samples with gradients where the method's plan says (AlignProp: the last K
    denoiser calls, K drawn once per rollout)."""
    prompts, metadata = zip(*(trainer.prompt_set(trainer.streams.prompts) for _ in range(trainer.batch_size)))
    prompts, metadata = list(prompts), list(metadata)
    rollout = trainer.rollout
    cond = rollout.encode(prompts)
    plan = trainer.method.draw(trainer.streams.truncation)
    latents = rollout.initial_latents(len(prompts), trainer.streams.noise)
    penalty = [] if trainer.kl_coeff else None
    images = methods.images(rollout, cond, latents, plan, trainer.streams.noise, penalty)
    copies = len(images) // len(prompts)  # DRaFT-LV scores n one-step samples of each prompt
    prompts, metadata = prompts * copies, metadata * copies
    with record_function("alignprop.reward"):
        rewards, components, info = trainer.reward_fn(images, prompts, metadata)
    loss = reward_loss(rewards, trainer.reward_target) * trainer.loss_coeff
    kl = torch.cat(penalty).mean() if penalty else None  # over the grad steps and the samples
    if kl is not None:
        loss = loss + trainer.kl_coeff * kl
    if torch.is_grad_enabled() and not loss.requires_grad:
        raise RuntimeError(
            "The reward function returned rewards with no gradient w.r.t. the images, so there is nothing to "
            "backpropagate. AlignProp needs a differentiable reward: keep the computation in torch on the "
            "images it is given (no .detach(), .item(), .cpu().numpy(), PIL or torch.no_grad())."
        )
    kl = None if kl is None else kl.detach()
    return MicroBatch(loss, rewards.detach(), components, info, prompts, plan.k, images.detach(), kl)


def reduce_info(accelerator, infos):
    """Per-sample tensors of `{name: [B]}` dicts -> `reward/<name>` means over all processes."""
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


def train_step(trainer, keep_samples=False):
    """One optimizer step over `accumulation_steps` micro-batches -> (metrics reduced over processes, Samples).

    A non-finite loss on any process, or non-finite gradients without a GradScaler, skips the update
    (gradients dropped, nothing applied); `nonfinite` counts them. fp16 overflow in the gradients is left
    to the GradScaler, which skips the step and lowers its scale (`skipped` = 1, `nonfinite` = 0).
    With `keep_samples` the Samples hold this process's last micro-batch (a device-to-host copy).
    """
    accelerator = trainer.accelerator
    start = time.perf_counter()
    batches = []
    nonfinite = torch.zeros((), device=accelerator.device)
    grad_norm = torch.tensor(float("nan"))
    for _ in range(trainer.accumulation_steps):
        with accelerator.accumulate(trainer.rollout.train_denoiser), accelerator.autocast():
            batch = micro_batch(trainer)
            finite = torch.isfinite(batch.loss.detach())
            nonfinite += (~finite).float()
            # Backward even when non-finite: under DDP every rank must join the all-reduce.
            with record_function("alignprop.backward"):
                accelerator.backward(torch.where(finite, batch.loss, torch.zeros_like(batch.loss)))
            if accelerator.sync_gradients:
                nonfinite = accelerator.reduce(nonfinite, reduction="sum")
                if nonfinite.item() == 0:
                    grad_norm = accelerator.clip_grad_norm_(trainer.params, trainer.max_grad_norm)
                    # The norm of the synced gradients: every rank takes the same decision. With fp16's
                    # GradScaler an inf norm is its normal signal (it skips the step and lowers the scale).
                    if torch.isfinite(grad_norm) or accelerator.scaler is not None:
                        with record_function("alignprop.optimizer"):
                            trainer.optimizer.step()
                    else:
                        nonfinite += 1
                trainer.optimizer.zero_grad(set_to_none=True)
        batches.append(batch)
    rewards = accelerator.gather(torch.cat([b.rewards for b in batches]).float())
    # Mean loss and mean K over all processes, in one reduction.
    means = torch.stack(
        [
            torch.stack([b.loss.detach() for b in batches]).mean().float(),
            torch.tensor(sum(b.k for b in batches) / len(batches), device=accelerator.device),
        ]
    )
    loss, k_mean = accelerator.reduce(means, reduction="mean")
    skipped = nonfinite.item() > 0 or bool(getattr(accelerator, "optimizer_step_was_skipped", False))
    peak = gpu_peaks_gib(accelerator)
    metrics = {
        **reduce_info(accelerator, [{**b.components, **b.info} for b in batches]),
        "loss": loss.item(),
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std().item() if rewards.numel() > 1 else 0.0,
        "k_mean": k_mean.item(),
        "grad_norm": float(grad_norm),
        "nonfinite": int(nonfinite.item()),
        "skipped": int(skipped),
        "seconds": time.perf_counter() - start,
        **({"gpu_peak_gib": max(peak)} if peak is not None else {}),
    }
    if batches[0].kl is not None:
        metrics["kl"] = accelerator.reduce(torch.stack([b.kl for b in batches]).mean(), reduction="mean").item()
    last = batches[-1]
    samples = Samples([p for b in batches for p in b.prompts])
    if keep_samples:
        samples.images, samples.image_prompts, samples.rewards = (
            last.images.float().cpu(),
            last.prompts,
            last.rewards.cpu(),
        )
    return metrics, samples
