"""The naive baseline beside scripts/benchmark.py: diffusers' own pipeline loop run with gradients.

What a user would write without alignprop: the family's diffusers pipeline (`__call__` with its no_grad
decorator bypassed, output_type="pt"), a peft LoRA on the denoiser (peft's side-branch forward, no merge, no
compile) and the denoiser's own gradient checkpointing (`enable_gradient_checkpointing()`, every block
recomputed in backward); the pipeline encodes the prompts with its text encoders on the GPU. Truncated
backprop to the last K steps is the step-end callback detaching the latents before them, so the steps
before the cut still run with gradients enabled (their graphs are built, then dropped). Same config,
random weights, reward and printout as scripts/benchmark.py, for ratios on the same card in one command:

    python scripts/benchmark.py --config config/align_prop.py:hps_flux --precision bf16 --steps 28 --batch 1 \\
        --ks 1,4 --config.reward.hps.path=random --out $OUT && \\
    python scripts/benchmark_naive.py --config config/align_prop.py:hps_flux --precision bf16 --steps 28 \\
        --batch 1 --ks 1,4 --config.reward.hps.path=random --out $OUT
    python scripts/benchmark_naive.py --config config/align_prop.py:tiny_flux --tiny --precision no --batch 1 \\
        --steps 3 --ks 1,3 --iters 1                                                 # CPU smoke test
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch


def parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ks", default="1,4", help="comma-separated K values ('all': every step)")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--iters", type=int, default=3, help="timed steps per K after one warm-up step")
    ap.add_argument("--precision", default="bf16", choices=["fp16", "bf16", "no"])
    ap.add_argument("--label", default="naive")
    ap.add_argument("--tiny", action="store_true", help="tiny random models (a CPU smoke test of this script)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    return ap


def naive_images(pipe, prompts, latents, k, num_steps, guidance_scale, height, width):
    """Images [B, 3, H, W] in [0, 1] from the pipeline's own loop and decode with gradients; only the last `k`
    steps' denoiser outputs reach them (the latents are detached after step num_steps − k − 1)."""
    cut = num_steps - k - 1

    def detach_before_the_cut(pipe, i, t, tensors):
        return {"latents": tensors["latents"].detach()} if i == cut else {}

    call = type(pipe).__call__.__wrapped__  # under torch.no_grad's decorator
    return call(pipe, prompts, height=height, width=width, num_inference_steps=num_steps,
                guidance_scale=guidance_scale, latents=latents, output_type="pt",
                callback_on_step_end=detach_before_the_cut).images


def main(argv):
    from alignprop import config as configs

    spec, overrides, rest = configs.split_command_line(argv)
    args = parser().parse_args(rest)
    os.makedirs(args.out, exist_ok=True)

    from alignprop import families, lora, rewards, speed
    from alignprop.errors import UserError
    from alignprop.profiling import K_COLUMNS, full_size_defaults, k_table, save_results
    from alignprop.rng import RandomStreams

    config = configs.load(spec)
    config.mixed_precision, config.sample.num_steps = args.precision, args.steps
    try:
        for key, value in overrides.items():
            configs.override(config, key, value)
        full_size_defaults(config, args, overrides)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        speed.resolve_precision(config, device)
        configs.check_sampling(config)
        family, source = families.resolve(config.model)
    except UserError as e:
        raise SystemExit(str(e)) from None
    speed.set_torch_flags(config.speed)
    dtype = speed.inference_dtype(args.precision)
    components = family.load(source, config.model, config.seed, device)
    components.offload_text_encoders = False  # the pipeline encodes on its execution device
    family.freeze_and_cast(components, device, dtype)
    lora.add_lora(components.denoiser, config.lora.rank, config.lora.alpha, config.lora.targets or family.lora_targets)
    components.denoiser.enable_gradient_checkpointing()
    pipe = family.pipeline(components)
    pipe.set_progress_bar_config(disable=True)
    reward_fn = rewards.build(rewards.parse(config.reward_fn), config.reward, config.seed, device, dtype)
    params = lora.trainable_parameters(components.denoiser)
    optimizer = torch.optim.AdamW(params, lr=config.train.learning_rate)
    height, width = family.image_size(components, config.sample.height, config.sample.width)
    shape = family.latent_shape(components, height, width)
    noise = RandomStreams(config.seed, 0, device).noise
    prompts = ["a photo of a cat"] * args.batch
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step(k):
        latents = family.initial_latents(components, args.batch, shape, noise, device)
        with autocast:
            images = naive_images(pipe, prompts, latents, k, args.steps, config.sample.guidance_scale, height, width)
            total, _, _ = reward_fn(images, prompts, [{}] * args.batch)
            loss = rewards.reward_loss(total, config.reward.target) * config.train.loss_coeff
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return loss.item()

    results = {"label": args.label, "card": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "precision": args.precision, "batch": args.batch, "steps": args.steps, "model": config.model.source,
               "overrides": overrides, "lora_params": sum(p.numel() for p in params), "k": {}}
    for text in args.ks.split(","):
        k = args.steps if text == "all" else int(text)
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            loss = step(k)  # warm-up
            times = [time.perf_counter() - start]
            for _ in range(args.iters):
                start = time.perf_counter()
                loss = step(k)
                times.append(time.perf_counter() - start)
            timed = times[1:] or times
            row = {"s_per_step_median": statistics.median(timed), "s_all": times, "finite": bool(loss == loss),
                   "peak_GiB": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")}
        except torch.cuda.OutOfMemoryError:
            row = {"error": "OOM"}
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        results["k"][text] = row
        print(f"K={text}", json.dumps(row), flush=True)
    save_results(results, args.out, args.label)
    print(f"\n| {results['card']} | {config.model.source} | batch {args.batch} | {args.precision} | "
          f"naive diffusers loop |")
    print(k_table(results["k"], K_COLUMNS[:2]))


if __name__ == "__main__":
    main(sys.argv[1:])
