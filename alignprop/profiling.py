"""Measuring a training step: the helpers of scripts/benchmark.py and the naive baselines beside it (the
benchmark's models, timing, memory, the denoiser's throughput, profiles, compiled-vs-eager checks, DDP)."""

import json
import os
import time

import torch


BF16_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}
K_COLUMNS = (("s/step", "s_per_step_median"), ("peak GiB", "peak_GiB"), ("images/s", "images_per_s"))


def save_results(results, out, label):
    """Write a benchmark's results to `out/bench_<label>.json`."""
    with open(os.path.join(out, f"bench_{label}.json"), "w") as f:
        json.dump(results, f, indent=1)


def k_table(rows, columns=K_COLUMNS):
    """The markdown table of a benchmark's rows {K: row} (a failed row shows its error in the first column)."""
    lines = ["| K | " + " | ".join(name for name, _ in columns) + " |", "|---|" + "---|" * len(columns)]
    for k, row in rows.items():
        cells = ([row["error"]] + [""] * (len(columns) - 1) if "error" in row
                 else [f"{row[key]:.2f}" for _, key in columns])
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bf16_peak(card, given):
    return given or next((v for name, v in BF16_PEAK_TFLOPS.items() if name in card), None)


def full_size_defaults(config, args, overrides):
    """The benchmark's models, unless overridden: the family's full-size architecture with random weights
    (its first random size) and a CLIP ViT-L/14-sized aesthetic tower, or tiny models with --tiny."""
    from alignprop import families

    if "model.source" not in overrides:
        family = families.get(config.model.family)
        config.model.source = "tiny" if args.tiny else f"random:{next(iter(family.random_variants))}"
    if "reward.aesthetic.clip_model" not in overrides:
        config.reward.aesthetic.clip_model = "tiny" if args.tiny else "random"


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib():
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def one_rollout(trainer, k, seed, autocast=None):
    """One micro-batch of AlignProp with fixed K from a fixed seed (the same rollout at every call), the
    gradients zeroed before it; under `autocast` (default: the run's)."""
    from alignprop.rng import RandomStreams
    from alignprop.training import micro_batch
    import dataclasses

    from alignprop.truncation import Truncation

    steps = trainer.method.num_steps
    trainer.method = dataclasses.replace(trainer.method, name="alignprop", truncation=Truncation("fixed", steps, k))
    trainer.streams = RandomStreams(seed, 0, trainer.accelerator.device)
    trainer.optimizer.zero_grad(set_to_none=True)
    with autocast or trainer.accelerator.autocast():
        return micro_batch(trainer)


def lora_grads_of_one_rollout(trainer, k, seed=1234):
    """Images, rewards and LoRA gradients of one micro-batch with fixed K from a fixed seed."""
    batch = one_rollout(trainer, k, seed)
    trainer.accelerator.backward(batch.loss)
    grads = torch.cat([p.grad.detach().float().flatten() for p in trainer.params])
    trainer.optimizer.zero_grad(set_to_none=True)
    return batch.images.float(), batch.rewards.float(), grads


UNDERFLOW_SCALES = (2.0**16, 2.0**18, 2.0**20, 2.0**22, 2.0**24)


def zero_gradient_fraction(trainer, k, scales=UNDERFLOW_SCALES, seed=1234):
    """How many LoRA-B gradient entries one rollout's backward leaves exactly zero, per loss scale.

    The same micro-batch (fixed K and seed) for each scale, its loss times the scale backpropagated as a GradScaler
    does (outside it, so that no scale is skipped or changed). Returns {scale: {"zero_fraction", "finite"}}: in
    fp16, small gradients underflow to zero below the right scale and overflow (non-finite) above it; at LoRA's
    initialization (B = 0) the A gradients are zero by construction, so B's are the measure.
    """
    lora_b = [p for name, p in trainer.rollout.components.denoiser.named_parameters() if "lora_B" in name]
    out = {}
    for scale in scales:
        (one_rollout(trainer, k, seed).loss.float() * scale).backward()
        grads = torch.cat([p.grad.detach().flatten() for p in lora_b if p.grad is not None])
        out[scale] = {"zero_fraction": (grads == 0).float().mean().item(),
                      "finite": bool(torch.isfinite(grads).all())}
    trainer.optimizer.zero_grad(set_to_none=True)
    return out


def fp8_drift(trainer, k, seed=1234):
    """How far `config.speed.fp8_prefix` moves one rollout's images and rewards (fixed K and seed), beside what the
    run's own rounding does to them: the exact rollout against itself with other cuDNN kernels (benchmark mode
    flipped), and against the other 16-bit precision (fp16 compute where the run is bf16, or bf16 where fp16).
    Each: the largest and the mean absolute difference of the [0, 1] images, and of the rewards."""
    import dataclasses

    rollout = trainer.rollout
    prepared = rollout.prepared
    if not prepared.fp8_layers:
        raise ValueError("--fp8-drift measures config.speed.fp8_prefix: pass --config.speed.fp8_prefix=True")

    def images_and_rewards(autocast=None):
        batch = one_rollout(trainer, k, seed, autocast)  # with gradients on, as in training: the grad steps exact
        trainer.optimizer.zero_grad(set_to_none=True)
        return batch.images.detach().float(), batch.rewards.detach().float()

    def difference(a, b):
        return {"images_max_abs_diff": (a[0] - b[0]).abs().max().item(),
                "images_mean_abs_diff": (a[0] - b[0]).abs().mean().item(),
                "rewards_max_abs_diff": (a[1] - b[1]).abs().max().item(),
                "rewards_mean_abs_diff": (a[1] - b[1]).abs().mean().item()}

    fp8 = images_and_rewards()
    rollout.prepared = dataclasses.replace(prepared, fp8_layers=())  # the same model, exact
    try:
        exact = images_and_rewards()
        torch.backends.cudnn.benchmark = not torch.backends.cudnn.benchmark
        other_kernels = images_and_rewards()
        torch.backends.cudnn.benchmark = not torch.backends.cudnn.benchmark
        device = rollout.device.type
        other = torch.float16 if trainer.accelerator.mixed_precision == "bf16" else torch.bfloat16
        other_precision = images_and_rewards(torch.autocast(device, dtype=other))
    finally:
        rollout.prepared = prepared
    return {
        "k": k,
        "reward_mean": exact[1].mean().item(),
        "reward_std": exact[1].std().item() if len(exact[1]) > 1 else 0.0,
        "fp8_vs_exact": difference(fp8, exact),
        "exact_other_kernels_vs_exact": difference(other_kernels, exact),
        f"{str(other).removeprefix('torch.')}_vs_exact": difference(other_precision, exact),
    }


def compile_report():
    """Where this process's compilation went so far and what the caches gave: torch's own compile timers (seconds,
    summed over graphs: dynamo's tracing, AOTAutograd, inductor's lowering and kernel compilation) and the cache
    counters (inductor's FX-graph cache, AOTAutograd's), to set a warm start beside a cold one."""
    from torch._dynamo import utils

    times = {name: round(sum(values), 3) for name, values in getattr(utils, "compilation_time_metrics", {}).items()}
    caches = {f"{group}/{name}": count for group in ("inductor", "aot_autograd")
              for name, count in utils.counters[group].items() if "cache" in name}
    return {"seconds": times, "caches": caches}


def compare_with_eager(trainer, k):
    """How far the compiled step is from the same step run eagerly (torch.compiler's force_eager stance).

    The noise floor beside it: the eager step against itself with other cuDNN kernels (benchmark mode
    flipped), i.e. what rounding alone does to these numbers in this precision.
    """

    def differences(a, b):
        (images, rewards, grads), (images_ref, rewards_ref, grads_ref) = a, b
        return {
            "images_max_abs_diff": (images - images_ref).abs().max().item(),
            "rewards_max_abs_diff": (rewards - rewards_ref).abs().max().item(),
            "grad_rel_diff": ((grads - grads_ref).norm() / grads_ref.norm()).item(),
            "grad_cosine": torch.nn.functional.cosine_similarity(grads, grads_ref, dim=0).item(),
        }

    compiled = lora_grads_of_one_rollout(trainer, k)
    with torch.compiler.set_stance("force_eager"):
        eager = lora_grads_of_one_rollout(trainer, k)
        torch.backends.cudnn.benchmark = not torch.backends.cudnn.benchmark
        eager_other_kernels = lora_grads_of_one_rollout(trainer, k)
        torch.backends.cudnn.benchmark = not torch.backends.cudnn.benchmark
    return {
        "k": k,
        "reward_scale": eager[1].abs().max().item(),
        "compiled_vs_eager": differences(compiled, eager),
        "eager_vs_eager_other_kernels": differences(eager_other_kernels, eager),
    }


def wrap_in_ddp(trainer, components):
    """The grad steps through DDP over a world-size-1 process group (gloo on the CPU, NCCL on a GPU): DDP's
    hooks, buckets and all-reduce run as on several GPUs, and the no-grad steps use the unwrapped module."""
    import socket

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                world_size=1, rank=0)
    device = trainer.accelerator.device
    trainer.rollout.train_denoiser = DistributedDataParallel(  # as training's (training.accelerator_handlers)
        components.denoiser, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)


def train_step_synced(trainer):
    from alignprop.training import train_step

    metrics, _ = train_step(trainer)
    sync()
    return metrics


def profile_step(trainer, path):
    """One training step under torch.profiler: the table of ops and the time of each phase of the step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        train_step_synced(trainer)
    events = prof.key_averages()
    with open(path, "w") as f:
        f.write(events.table(sort_by="self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total",
                             row_limit=60, max_name_column_width=80))
    phases = {}
    for event in events:
        if event.key.startswith("alignprop."):
            device_us = getattr(event, "device_time_total", 0) or getattr(event, "cuda_time_total", 0)
            phases[event.key] = {"cpu_s": event.cpu_time_total / 1e6, "device_s": device_us / 1e6,
                                 "calls": event.count}
    return dict(sorted(phases.items()))


def denoiser_throughput(trainer, batch):
    """Seconds and TFLOP of one no-grad guided denoiser call (the CFG batch, or the batch alone for a family
    without CFG), through the compiled graph of a training rollout's no-grad steps (the same shapes, dtype, grad
    mode and float8 setting: no new compilation; float8 with `config.speed.fp8_prefix`, its TFLOP those of the
    exact call)."""
    from torch.utils.flop_counter import FlopCounterMode

    rollout = trainer.rollout
    cond = rollout.encode(["a photo of a cat"] * batch)
    latents = rollout.initial_latents(batch, torch.Generator(rollout.device).manual_seed(0))
    guided = rollout.guided(rollout.prepared.denoiser, cond, batch)
    t = rollout.schedule.model_timesteps[len(rollout.schedule) // 2]
    with torch.no_grad(), trainer.accelerator.autocast():
        with rollout.prepared.sampling_prefix():
            for _ in range(3):
                guided(latents, t)
            sync()
            start = time.perf_counter()
            for _ in range(10):
                guided(latents, t)
            sync()
            seconds = (time.perf_counter() - start) / 10
        with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
            guided(latents, t)
    return seconds, counter.get_total_flops() / 1e12
