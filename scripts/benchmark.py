"""Seconds per training step and peak memory of alignprop at full size with random weights (nothing downloaded).

Runs the real training step (`alignprop.training.train_step`) on the config's model family built at full
size with random weights (the family's first random size unless `--config.model.source` says otherwise: SD 1.5
for the default config, `random:sdxl` for the SDXL configs, `random:sd35m` for sd3, `random:flux-dev` for flux)
and the aesthetic reward on a CLIP ViT-L/14-sized tower, for several K, and prints one JSON and a markdown table
with the card, batch, K, s/step, peak memory and the denoiser's TFLOP/s (and its fraction of the card's bf16
peak). The precision, image size and checkpoint plan are the config's. Run the peer script (or the naive
diffusers loops, scripts/naive_sdxl.py and scripts/benchmark_naive.py) in the same command for ratios on the
same card:

    python scripts/benchmark.py --batch 4 --ks 1,10,50,uniform --out $OUT
    python scripts/benchmark.py --batch 4 --ks 1 --config.speed.checkpoint_blocks=False   # one option off
    python scripts/benchmark.py --config config/align_prop.py:aesthetic_sdxl --batch 1 --ks 1,10 --out $OUT
    python scripts/benchmark.py --config config/align_prop.py:hps_flux --precision bf16 --steps 28 --batch 1 \
        --ks 1,4 --config.reward.hps.path=random --out $OUT                           # FLUX.1-dev-sized, HPS-sized
    python scripts/benchmark.py --batch 4 --ks 1 --methods alignprop,draft_lv,refl,drtune,alignprop+kl --out $OUT
    python scripts/benchmark.py --batch 4 --ks 1 --iters 0 --underflow 1 --out $OUT   # fp16's zero LoRA-B gradients
    python scripts/benchmark.py --tiny --batch 2 --steps 4 --ks 1 --iters 1 --precision no  # CPU smoke test
"""

import time

START = time.perf_counter()  # the process's start, for the time to the first step (imports included)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402


def parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--ks", default="1,10,50,uniform", help="comma-separated K values; 'uniform' = U[1, steps]")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--total-batch", type=int, default=None,
                    help="samples per optimizer step over all processes (default: batch x processes)")
    ap.add_argument("--iters", type=int, default=3,
                    help="timed steps per K after one warm-up step (0: time the warm-up step itself)")
    ap.add_argument("--precision", default=None, choices=["fp16", "bf16", "no"],
                    help="default: the config's mixed_precision (auto: bf16 on a GPU that has it)")
    ap.add_argument("--methods", default=None,
                    help="comma-separated config.train.method names to time in turn (default: the config's method); "
                         "NAME+kl adds DRaFT+'s penalty (config.train.kl_coeff, or --kl-coeff where that is 0). "
                         "--ks applies to the methods with a K (alignprop, draft_k)")
    ap.add_argument("--kl-coeff", type=float, default=0.1, help="the penalty's coefficient for NAME+kl entries")
    ap.add_argument("--label", default="alignprop")
    ap.add_argument("--tiny", action="store_true", help="tiny random models (a CPU smoke test of this script)")
    ap.add_argument("--profile", action="store_true",
                    help="profile one step of the first K (phase times in the JSON, op table in OUT/profile_LABEL.txt)")
    ap.add_argument("--ddp", action="store_true",
                    help="run the grad steps through a one-process DistributedDataParallel wrapper (a world-size-1 "
                         "process group), as multi-GPU runs do, to compare with the unwrapped module on one GPU")
    ap.add_argument("--ddp-optimizer", action="store_true",
                    help="with --ddp: dynamo's DDPOptimizer back on (the compiled grad graph split at DDP's bucket "
                         "boundaries, as before alignprop turned it off), to measure what the split costs")
    ap.add_argument("--compile-cache", default=None, metavar="FILE",
                    help="load torch.compile's cache artifacts from FILE if it exists, and save them there after the "
                         "first step (a cold run writes it, a second run with the same shapes starts warm: run that "
                         "one with a fresh TORCHINDUCTOR_CACHE_DIR to measure the file alone)")
    ap.add_argument("--compare-eager", type=int, default=0, metavar="K",
                    help="with torch.compile on: images, rewards and LoRA gradients of one rollout with this K, "
                         "compiled vs eager")
    ap.add_argument("--underflow", type=int, default=0, metavar="K",
                    help="the fraction of LoRA-B gradient entries that come out exactly zero after one rollout with "
                         "this K, for loss scales 2^16 to 2^24 (fp16's underflow; fp32 and bf16 have none)")
    ap.add_argument("--fp8-drift", type=int, default=0, metavar="K",
                    help="with --config.speed.fp8_prefix=True: how far the float8 prefix moves one rollout's images "
                         "and rewards (this K), beside the exact rollout with other cuDNN kernels and in the other "
                         "16-bit precision")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the card's dense bf16 peak TFLOP/s (default: known for H100/H200/A100, else not reported)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    return ap


# Dense bf16 tensor-core peaks (TFLOP/s) of the SXM cards, from NVIDIA's data sheets.
from alignprop.profiling import (  # noqa: E402
    bf16_peak, compare_with_eager, compile_report, denoiser_throughput, fp8_drift, full_size_defaults, k_table,
    peak_gib, profile_step, save_results, train_step_synced, wrap_in_ddp, zero_gradient_fraction,
)


def max_k(ks, steps):
    """The largest K of --ks ('uniform' reaches the number of steps), at most the number of steps."""
    return min(steps, max(steps if k == "uniform" else int(k) for k in ks.split(",")))


def runs(args, config):
    """(row key, method, penalty coefficient, K) of each timed row: the rows are keyed by K alone when only the
    config's method runs (as before --methods), else by the method and its K."""
    from alignprop import methods
    from alignprop.errors import ConfigError

    ks = args.ks.split(",")
    if args.methods is None:
        return [(k, config.train.method, config.train.kl_coeff, k) for k in ks]
    out = []
    for entry in args.methods.split(","):
        name, _, extra = entry.partition("+")
        if name not in methods.METHODS or extra not in ("", "kl"):
            raise ConfigError(f"--methods entry {entry!r}: give one of {', '.join(methods.METHODS)}, each "
                              f"optionally followed by +kl")
        kl = (config.train.kl_coeff or args.kl_coeff) if extra else 0.0
        trial = config.copy_and_resolve_references()
        trial.train.method = name
        if name == "draft_k":
            trial.train.truncation = "fixed"
        problems = methods.problems(trial)
        if problems:
            raise ConfigError(f"--methods entry {entry!r}: " + "; ".join(problems))
        if name in ("alignprop", "draft_k"):
            out.extend((f"{entry} K={k}", name, kl, k) for k in ks if not (name == "draft_k" and k == "uniform"))
        else:
            out.append((entry, name, kl, ks[0]))
    return out


def main(argv):
    from alignprop import config as configs

    spec, overrides, rest = configs.split_command_line(argv)
    args = parser().parse_args(rest)
    os.makedirs(args.out, exist_ok=True)

    from accelerate import Accelerator

    from alignprop import families, rewards, speed, training
    from alignprop.errors import ConfigError, UserError

    config = configs.load(spec)
    config.mixed_precision = args.precision or config.mixed_precision
    config.sample.num_steps = args.steps
    config.train.batch_size_per_gpu = config.train.total_batch_size = config.train.total_samples_per_epoch = args.batch
    # Each K of --ks is set on the trainer below; the memory plan is chosen for the largest.
    config.train.truncation, config.train.k = "fixed", max_k(args.ks, args.steps)
    try:
        for key, value in overrides.items():
            configs.override(config, key, value)
        # Full-size architectures with random weights (the compute and memory of the real run), or tiny models.
        full_size_defaults(config, args, overrides)
        speed.resolve_precision(config)
        accelerator = Accelerator(mixed_precision=config.mixed_precision,
                                  kwargs_handlers=training.accelerator_handlers(config))
        n = accelerator.num_processes
        total = args.total_batch or args.batch * n
        config.train.total_batch_size = config.train.total_samples_per_epoch = total
        settings = configs.check(config, n)
        rows = runs(args, config)  # a wrong --methods entry stops here, before any model loads
        if args.fp8_drift and not config.speed.fp8_prefix:
            raise ConfigError("--fp8-drift measures config.speed.fp8_prefix: add --config.speed.fp8_prefix=True")
    except UserError as e:
        raise SystemExit(str(e)) from None
    speed.set_torch_flags(config.speed)
    device = accelerator.device
    speed.load_compile_cache(args.compile_cache)
    components = families.load_frozen(settings.family, settings.source, config, device)
    reward_fn = rewards.build(
        settings.reward, config.reward, config.seed, device, speed.inference_dtype(config.mixed_precision)
    )
    trainer, _ = training.make_trainer(config, settings, accelerator, components, reward_fn)
    if args.ddp:
        wrap_in_ddp(trainer, components)
        torch._dynamo.config.optimize_ddp = args.ddp_optimizer

    startup = time.perf_counter() - START
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    results = {
        "label": args.label,
        "card": card,
        "precision": config.mixed_precision,
        "batch": args.batch,
        "steps": args.steps,
        "model": config.model.source,
        "family": config.model.family,
        "size": [trainer.rollout.height, trainer.rollout.width],
        "vae_dtype": str(components.vae.dtype).removeprefix("torch."),
        "processes": n,
        "ddp": args.ddp or n > 1,
        "ddp_optimizer": args.ddp_optimizer,
        "accumulation": settings.plan.accumulation_steps,
        "total_batch": total,
        "torch": torch.__version__,
        "overrides": overrides,
        "plan": speed.describe(config, device, trainer.memory_plan),
        "memory_plan": trainer.memory_plan and {
            **dataclasses.asdict(trainer.memory_plan), "describe": trainer.memory_plan.describe()},
        "startup_s": startup,  # process start to the trainer built (imports, models, the memory probe)
        "compile_cache": args.compile_cache,
        "lora_params": sum(p.numel() for p in trainer.params),
        "k": {},
    }
    if accelerator.is_main_process:
        print("plan", json.dumps({"plan": results["plan"], "memory_plan": results["memory_plan"],
                                  "startup_s": startup}), flush=True)
    import diffusers, peft, transformers  # noqa: E401

    results.update(diffusers=diffusers.__version__, transformers=transformers.__version__, peft=peft.__version__)
    from alignprop.truncation import Truncation

    for key, name, kl_coeff, k in rows:
        truncation = (
            Truncation("uniform", args.steps, k_min=1, k_max=args.steps)
            if k == "uniform"
            else Truncation("fixed", args.steps, int(k))
        )
        # This method with this K (the methods without a K ignore it).
        trainer.method = dataclasses.replace(trainer.method, name=name, truncation=truncation)
        trainer.kl_coeff = kl_coeff
        try:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            metrics = train_step_synced(trainer)  # warm-up (and compilation, with torch.compile on)
            first = time.perf_counter() - start
            if "to_first_step_s" not in results:
                results["to_first_step_s"] = time.perf_counter() - START
                results["compiled_graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
                results["compile"] = compile_report()
                speed.save_compile_cache(args.compile_cache)
            times = [first]  # --iters 0: the warm-up step alone (its peak includes cuDNN's algorithm search)
            if args.iters and torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            if args.iters:
                times = []
            for _ in range(args.iters):
                start = time.perf_counter()
                metrics = train_step_synced(trainer)
                times.append(time.perf_counter() - start)
            median = statistics.median(times)
            row = {
                "s_per_step_median": median,
                "s_all": times,
                "peak_GiB": peak_gib(),
                "first_step_s": first,
                "images_per_s": total / median,
                "finite": bool(torch.isfinite(torch.tensor(metrics["loss"]))),
            }
            if args.profile and "profile" not in results:
                path = os.path.join(args.out, f"profile_{args.label}.txt")
                results["profile"] = {"k": k, "table": path, "phases": profile_step(trainer, path)}
                print("profile", json.dumps(results["profile"]), flush=True)
        except torch.cuda.OutOfMemoryError:
            row = {"error": "OOM"}
            trainer.optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        row["method"], row["kl_coeff"] = name, kl_coeff
        results["k"][key] = row
        if accelerator.is_main_process:
            print(f"K={key}", json.dumps(row), flush=True)
            save_results(results, args.out, args.label)  # each row as it comes: a run cut by its time limit keeps them

    if args.underflow:
        results["zero_lora_b_grad_fraction"] = {
            f"2^{int(math.log2(scale))}": row for scale, row in zero_gradient_fraction(trainer, args.underflow).items()}
        results["underflow_k"] = args.underflow
        print("zero_lora_b_grad_fraction", json.dumps(results["zero_lora_b_grad_fraction"]), flush=True)

    if args.fp8_drift:
        results["fp8_drift"] = fp8_drift(trainer, args.fp8_drift)
        print("fp8_drift", json.dumps(results["fp8_drift"]), flush=True)

    if args.compare_eager:
        results["compiled_vs_eager"] = compare_with_eager(trainer, args.compare_eager)
        print("compiled_vs_eager", json.dumps(results["compiled_vs_eager"]), flush=True)

    # Gradient sync check: the LoRA weights must be bit-identical on every rank.
    results["lora_identical_across_ranks"] = training.lora_in_sync(accelerator, trainer.params)
    if not accelerator.is_main_process:
        return
    seconds, tflop = denoiser_throughput(trainer, args.batch)
    peak = bf16_peak(card, args.peak_tflops)
    results.update(
        denoiser_fwd_cfg_batch_s=seconds, denoiser_fwd_cfg_batch_tflop=tflop, denoiser_fwd_tflops_per_s=tflop / seconds,
        card_bf16_peak_tflops=peak, denoiser_fwd_fraction_of_peak=peak and tflop / seconds / peak,
    )
    print(json.dumps(results, indent=1), flush=True)
    save_results(results, args.out, args.label)
    size = "x".join(map(str, results["size"]))
    print(f"\n| {card} | {config.model.source} {size} | batch {args.batch} | {config.mixed_precision} | "
          f"{overrides or ''} |")
    of_peak = f" ({tflop / seconds / peak:.0%} of the card's bf16 peak {peak:.0f})" if peak else ""
    fp8 = " (float8 matmuls: config.speed.fp8_prefix)" if trainer.rollout.prepared.fp8_layers else ""
    print(f"denoiser forward on the CFG batch{fp8}: {seconds * 1e3:.1f} ms, {tflop:.2f} TFLOP, "
          f"{tflop / seconds:.0f} TFLOP/s{of_peak}")
    print(k_table(results["k"]))


if __name__ == "__main__":
    main(sys.argv[1:])
    from alignprop import speed

    speed.leave()  # its results are saved: out at most 30 s later, whatever torch.compile's workers do
