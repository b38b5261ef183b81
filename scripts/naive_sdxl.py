"""The naive baseline of the SDXL benchmark: diffusers' own SDXL pipeline loop with gradients on, as a user
would write reward backprop without this project. Run it beside scripts/benchmark.py, in the same command:

    python scripts/benchmark.py --config config/align_prop.py:aesthetic_sdxl --batch 1 --ks 1,10 --out $OUT
    python scripts/naive_sdxl.py --config config/align_prop.py:aesthetic_sdxl --batch 1 --ks 1,10 --out $OUT
    python scripts/naive_sdxl.py --config config/align_prop.py:tiny_sdxl --tiny --batch 1 --steps 3 --ks 1 --iters 1 \
        --precision no                                                                         # CPU smoke test

The loop is `StableDiffusionXLPipeline.__call__`'s (diffusers 0.42.1) without its `@torch.no_grad`: the
pipeline's own `encode_prompt`, `_get_add_time_ids`, scheduler (the config's DDIM) and VAE decode and
post-processing, the UNet with diffusers' `enable_gradient_checkpointing()`, every step's UNet call run
with gradients enabled, truncated as TRL's AlignProp truncates (trl 0.23.1, `pipeline_step_with_grad`
with `truncated_backprop_timestep = T - K`: the noise predictions of the first T - K steps are detached).
The VAE decoder and the reward keep all their activations; no merged LoRA, no compile. The models (full
size with random weights, as scripts/benchmark.py builds them), LoRA, reward, precision, image size and
optimizer are the config's, so the two scripts' numbers on one card give the ratio.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

from alignprop.profiling import full_size_defaults, k_table, peak_gib, save_results, sync


def parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ks", default="1,10", help="comma-separated K values (the last K steps keep gradients)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--iters", type=int, default=3, help="timed steps per K after one warm-up step")
    ap.add_argument("--precision", default=None, choices=["fp16", "bf16", "no"],
                    help="default: the config's mixed_precision")
    ap.add_argument("--label", default="naive_sdxl")
    ap.add_argument("--tiny", action="store_true", help="tiny random models (a CPU smoke test of this script)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    return ap


def naive_images(pipe, prompts, latents, num_steps, guidance_scale, k, height, width, eta=0.0, generator=None):
    """Images [B, 3, H, W] in [0, 1] from x_T `latents`, the pipeline's loop with gradients through the last
    `k` noise predictions (TRL's truncation: the earlier ones are computed with gradients and detached)."""
    device = latents.device
    do_cfg = guidance_scale > 1.0
    prompt_embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
        prompts, device=device, do_classifier_free_guidance=do_cfg
    )
    pipe.scheduler.set_timesteps(num_steps, device=device)
    latents = latents * pipe.scheduler.init_noise_sigma
    add_time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=prompt_embeds.dtype,
                                          text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    add_text_embeds = pooled
    if do_cfg:
        prompt_embeds = torch.cat([negative_embeds, prompt_embeds])
        add_text_embeds = torch.cat([negative_pooled, pooled])
        add_time_ids = torch.cat([add_time_ids, add_time_ids])
    add_time_ids = add_time_ids.to(device).repeat(len(prompts), 1)
    added_cond_kwargs = {"text_embeds": add_text_embeds, "time_ids": add_time_ids}
    extra_step_kwargs = pipe.prepare_extra_step_kwargs(generator, eta)
    for i, t in enumerate(pipe.scheduler.timesteps):
        model_input = pipe.scheduler.scale_model_input(torch.cat([latents] * 2) if do_cfg else latents, t)
        noise_pred = pipe.unet(model_input, t, encoder_hidden_states=prompt_embeds,
                               added_cond_kwargs=added_cond_kwargs, return_dict=False)[0]
        if i < num_steps - k:
            noise_pred = noise_pred.detach()
        if do_cfg:
            uncond, text = noise_pred.chunk(2)
            noise_pred = uncond + guidance_scale * (text - uncond)
        latents = pipe.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
    # The pipeline decodes in the VAE's dtype (its in-place fp16 <-> fp32 flip cannot run under autograd).
    image = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pt", do_denormalize=[True] * len(image))


def main(argv):
    from alignprop import config as configs

    spec, overrides, rest = configs.split_command_line(argv, default="config/align_prop.py:aesthetic_sdxl")
    args = parser().parse_args(rest)
    os.makedirs(args.out, exist_ok=True)

    from accelerate import Accelerator

    from alignprop import families, rewards, speed, training
    from alignprop.errors import UserError

    config = configs.load(spec)
    config.mixed_precision = args.precision or config.mixed_precision
    config.sample.num_steps = args.steps
    try:
        for key, value in overrides.items():
            configs.override(config, key, value)
        full_size_defaults(config, args, overrides)
        if config.model.family != "sdxl":
            raise configs.ConfigError(
                f"config.model.family={config.model.family!r}: this is SDXL's naive baseline; for SD 1.x the peer "
                f"baseline is TRL 0.23.1's AlignProp step (BENCHMARKS.md)."
            )
        configs.check_sampling(config)
        speed.resolve_precision(config)
        accelerator = Accelerator(mixed_precision=config.mixed_precision)
    except UserError as e:
        raise SystemExit(str(e)) from None
    speed.set_torch_flags(config.speed)
    device = accelerator.device
    family, source = families.resolve(config.model)
    components = families.load_frozen(family, source, config, device)
    training.add_lora(config, family, components, device)
    pipe = family.pipeline(components)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.enable_gradient_checkpointing()
    height, width = family.image_size(components, config.sample.height, config.sample.width)
    reward_fn = rewards.build(rewards.parse(config.reward_fn), config.reward, config.seed, device,
                              speed.inference_dtype(config.mixed_precision))
    params = [p for p in pipe.unet.parameters() if p.requires_grad]
    optimizer = accelerator.prepare(training.build_optimizer(params, config.train))
    prompts = ["a photo of a cat"] * args.batch
    generator = torch.Generator(device).manual_seed(config.seed)
    shape = family.latent_shape(components, height, width)

    def train_step(k):
        latents = torch.randn((args.batch, *shape), generator=generator, device=device)
        with accelerator.autocast():
            images = naive_images(pipe, prompts, latents, args.steps, config.sample.guidance_scale, k, height, width,
                                  config.sample.eta, generator)
            total, _, _ = reward_fn(images, prompts, [{}] * args.batch)
            loss = -total.mean() * config.train.loss_coeff
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, config.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        return loss.item()

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    results = {"label": args.label, "card": card, "precision": config.mixed_precision, "batch": args.batch,
               "steps": args.steps, "model": config.model.source, "size": [height, width], "overrides": overrides,
               "torch": torch.__version__, "lora_params": sum(p.numel() for p in params), "k": {}}
    for k in (int(x) for x in args.ks.split(",")):
        try:
            train_step(k)  # warm-up
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            times, losses = [], []
            for _ in range(args.iters):
                start = time.perf_counter()
                losses.append(train_step(k))
                times.append(time.perf_counter() - start)
            median = statistics.median(times)
            row = {"s_per_step_median": median, "s_all": times, "peak_GiB": peak_gib(),
                   "images_per_s": args.batch / median, "finite": all(torch.isfinite(torch.tensor(losses)))}
        except torch.cuda.OutOfMemoryError:
            row = {"error": "OOM"}
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        results["k"][str(k)] = row
        print(f"K={k}", json.dumps(row), flush=True)
    print(json.dumps(results, indent=1), flush=True)
    save_results(results, args.out, args.label)
    print(f"\n| {card} | naive SDXL loop, {config.model.source} {height}x{width} | batch {args.batch} | "
          f"{config.mixed_precision} |")
    print(k_table(results["k"]))


if __name__ == "__main__":
    main(sys.argv[1:])
