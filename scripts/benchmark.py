"""Seconds per training step and peak memory of alignprop at Stable Diffusion 1.5 size, random weights.

Runs the real training step (`alignprop.training.train_step`) on SD 1.5-sized UNet/VAE/text encoder
and a CLIP ViT-L/14-sized aesthetic scorer built from configs (no download), for several K, and prints
one JSON and a markdown table. Run the peer script in the same command for ratios on the same card:

    python scripts/benchmark.py --batch 4 --ks 1,10,50,uniform --out $OUT
    python scripts/benchmark.py --batch 4 --ks 1 --set train.merged_lora=False   # one option off
"""

import argparse
import ast
import json
import os
import statistics
import time

import torch


def load_experiment(name):
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config", "align_prop.py")
    spec = importlib.util.spec_from_file_location("align_prop_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(name)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib():
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def lora_grads_of_one_rollout(ctx, k, seed=1234):
    """Images, rewards and LoRA gradients of one micro-batch with fixed K from a fixed seed."""
    from alignprop.rng import RandomStreams
    from alignprop.training import micro_batch

    ctx.train.truncation, ctx.train.k = "fixed", k
    ctx.streams = RandomStreams(seed, 0, ctx.accelerator.device)
    ctx.optimizer.zero_grad(set_to_none=True)
    with ctx.accelerator.autocast():
        loss, rewards, _, _, _, images = micro_batch(ctx)
    ctx.accelerator.backward(loss)
    grads = torch.cat([p.grad.detach().float().flatten() for p in ctx.params])
    ctx.optimizer.zero_grad(set_to_none=True)
    return images.float(), rewards.float(), grads


def compare_with_eager(ctx, k):
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

    compiled = lora_grads_of_one_rollout(ctx, k)
    with torch.compiler.set_stance("force_eager"):
        eager = lora_grads_of_one_rollout(ctx, k)
        torch.backends.cudnn.benchmark = not torch.backends.cudnn.benchmark
        eager_other_kernels = lora_grads_of_one_rollout(ctx, k)
        torch.backends.cudnn.benchmark = not torch.backends.cudnn.benchmark
    return {
        "k": k,
        "reward_scale": eager[1].abs().max().item(),
        "compiled_vs_eager": differences(compiled, eager),
        "eager_vs_eager_other_kernels": differences(eager_other_kernels, eager),
    }


def profile_step(ctx, path):
    """One training step under torch.profiler: the table of ops and the time of each phase of the step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        train_step_synced(ctx)
    events = prof.key_averages()
    with open(path, "w") as f:
        f.write(events.table(sort_by="self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total",
                             row_limit=60, max_name_column_width=80))
    phases = {}
    for event in events:
        if event.key.startswith("alignprop."):
            device_us = getattr(event, "device_time_total", 0) or getattr(event, "cuda_time_total", 0)
            old = phases.get(event.key, (0.0, 0.0))
            phases[event.key] = (max(old[0], event.cpu_time_total / 1e6), max(old[1], device_us / 1e6))
    return {key: {"cpu_s": cpu, "device_s": dev} for key, (cpu, dev) in sorted(phases.items())}


def train_step_synced(ctx):
    from alignprop.training import train_step

    metrics = train_step(ctx)
    sync()
    return metrics


def parse_override(item):
    """`KEY=VALUE` -> (KEY, VALUE as a Python literal, or the string itself)."""
    key, text = item.split("=", 1)
    try:
        return key, ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return key, text


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--ks", default="1,10,50,uniform", help="comma-separated K values; 'uniform' = U[1, steps]")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--total-batch", type=int, default=None,
                    help="samples per optimizer step over all processes (default: batch x processes)")
    ap.add_argument("--iters", type=int, default=3,
                    help="timed steps per K after one warm-up step (0: time the warm-up step itself)")
    ap.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "no"])
    ap.add_argument("--set", action="append", default=[], help="config override KEY=VALUE, e.g. train.merged_lora=False")
    ap.add_argument("--label", default="alignprop")
    ap.add_argument("--tiny", action="store_true", help="tiny random models (a CPU smoke test of this script)")
    ap.add_argument("--profile", action="store_true",
                    help="profile one step of the first K (phase times in the JSON, op table in OUT/profile_LABEL.txt)")
    ap.add_argument("--compare-eager", type=int, default=0, metavar="K",
                    help="with torch.compile on: images, rewards and LoRA gradients of one rollout with this K, "
                         "compiled vs eager")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    from accelerate import Accelerator

    from alignprop.models import load_frozen_components, set_torch_flags
    from alignprop.plan import make_batch_plan
    from alignprop.prompts import make_prompt_set
    from alignprop.rewards import make_reward_fn
    from alignprop.training import lora_in_sync, make_context
    from alignprop.validation import ConfigError, check_precision

    config = load_experiment("aesthetic")
    config.mixed_precision = args.precision
    config.sample.num_steps = args.steps
    config.train.batch_size_per_gpu = config.train.total_batch_size = config.train.total_samples_per_epoch = args.batch
    if args.tiny:
        config.pretrained.model = config.reward.aesthetic.clip_model = "tiny"
    else:  # SD 1.5 and CLIP ViT-L/14's aesthetic scorer, random weights built on the GPU
        config.random_weights = True
    config.update_from_flattened_dict(dict(parse_override(item) for item in args.set))
    set_torch_flags(config)

    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    device = accelerator.device
    try:
        check_precision(config.mixed_precision, device)
    except ConfigError as e:
        raise SystemExit(f"{e} (here: --precision)") from None
    components, dtype = load_frozen_components(config, device)
    reward_fn = make_reward_fn(config, device, dtype)
    n = accelerator.num_processes
    total = args.total_batch or args.batch * n
    plan = make_batch_plan(total, total, args.batch, n)
    ctx, _ = make_context(config, accelerator, components, reward_fn, make_prompt_set("simple_animals"), plan)

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    results = {
        "label": args.label, "card": card, "precision": args.precision, "batch": args.batch, "steps": args.steps,
        "processes": n, "accumulation": plan.accumulation_steps, "total_batch": total,
        "torch": torch.__version__, "overrides": args.set, "lora_params": sum(p.numel() for p in ctx.params), "k": {},
    }
    import diffusers, transformers, peft  # noqa: E401

    results.update(diffusers=diffusers.__version__, transformers=transformers.__version__, peft=peft.__version__)
    for k in args.ks.split(","):
        if k == "uniform":
            config.train.truncation, config.train.k_min, config.train.k_max = "uniform", 1, args.steps
        else:
            config.train.truncation, config.train.k = "fixed", int(k)
        try:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            metrics = train_step_synced(ctx)  # warm-up (and compilation, with torch.compile on)
            first = time.perf_counter() - start
            times = [first]  # --iters 0: the warm-up step alone (its peak includes cuDNN's algorithm search)
            if args.iters and torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            if args.iters:
                times = []
            for _ in range(args.iters):
                start = time.perf_counter()
                metrics = train_step_synced(ctx)
                times.append(time.perf_counter() - start)
            median = statistics.median(times)
            row = {
                "s_per_step_median": median, "s_all": times, "peak_GiB": peak_gib(), "first_step_s": first,
                "images_per_s": total / median, "finite": bool(torch.isfinite(torch.tensor(metrics["loss"]))),
            }
            if args.profile and "profile" not in results:
                path = os.path.join(args.out, f"profile_{args.label}.txt")
                results["profile"] = {"k": k, "table": path, "phases": profile_step(ctx, path)}
                print("profile", json.dumps(results["profile"]), flush=True)
        except torch.cuda.OutOfMemoryError:
            row = {"error": "OOM"}
            ctx.optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        results["k"][k] = row
        if accelerator.is_main_process:
            print(f"K={k}", json.dumps(row), flush=True)

    if args.compare_eager:
        results["compiled_vs_eager"] = compare_with_eager(ctx, args.compare_eager)
        print("compiled_vs_eager", json.dumps(results["compiled_vs_eager"]), flush=True)

    # Gradient sync check: the LoRA weights must be bit-identical on every rank.
    results["lora_identical_across_ranks"] = lora_in_sync(accelerator, ctx.params)
    if not accelerator.is_main_process:
        return

    # One no-grad UNet forward on the CFG batch (merged LoRA as in the prefix) and its FLOPs.
    from torch.utils.flop_counter import FlopCounterMode

    from alignprop.sampling import timestep_tensor

    unet, fwd_unet, t = components.unet, ctx.nograd_unet, timestep_tensor(500, device)
    size, width = unet.config.sample_size, unet.config.cross_attention_dim
    latents = torch.randn(2 * args.batch, unet.config.in_channels, size, size, device=device, dtype=dtype)
    embeds = torch.randn(2 * args.batch, 77, width, device=device, dtype=dtype)
    with torch.no_grad(), accelerator.autocast(), torch.nn.utils.parametrize.cached():
        for _ in range(3):
            fwd_unet(latents, t, encoder_hidden_states=embeds)
        sync()
        start = time.perf_counter()
        for _ in range(10):
            fwd_unet(latents, t, encoder_hidden_states=embeds)
        sync()
        fwd = (time.perf_counter() - start) / 10
        with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
            unet(latents, t, encoder_hidden_states=embeds)
    tflop = counter.get_total_flops() / 1e12
    results.update(unet_fwd_cfg_batch_s=fwd, unet_fwd_cfg_batch_tflop=tflop, unet_fwd_tflops_per_s=tflop / fwd)
    print(json.dumps(results, indent=1), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"bench_{args.label}.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"\n| {card} | batch {args.batch} | {args.precision} | {' '.join(args.set)} |")
    print("| K | s/step | peak GiB | images/s |\n|---|---|---|---|")
    for k, row in results["k"].items():
        if "error" in row:
            print(f"| {k} | {row['error']} | | |")
        else:
            print(f"| {k} | {row['s_per_step_median']:.2f} | {row['peak_GiB']:.2f} | {row['images_per_s']:.2f} |")


if __name__ == "__main__":
    main()
