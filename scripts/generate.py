"""Generate PNG images with the base model plus zero or more LoRAs, through the family's diffusers pipeline.

    python scripts/generate.py --lora logs/aesthetic/RUN:1.0 --prompt "a photo of an owl" --prompt "a koala" \
        --out generated/aesthetic
    python scripts/generate.py --lora logs/aesthetic/RUN:0.5 --lora logs/hps/RUN:0.5 \
        --prompt_set eval_simple_animals --out generated/soup            # two LoRAs mixed in ΔW space
    python scripts/generate.py --lora logs/aesthetic/RUN/checkpoint_8:1.0 --fuse exported/aesthetic_sd15
    python scripts/generate.py --config config/align_prop.py:tiny --lora logs/tiny/RUN \
        --prompt_set eval_simple_animals --out /tmp/gen                  # offline CPU, tiny models

The model and the sampling settings are those of the config (`--config FILE:EXPERIMENT`, default the
aesthetic experiment's SD 1.5; `--config.model.source=...`, `--config.sample.num_steps=...`,
`--config.sample.guidance_scale=...`, `--config.sample.height/width=...`, `--config.mixed_precision=...`,
checked as training checks them). A LoRA is a run folder, a checkpoint_N folder or a .safetensors file,
with an optional weight (PATH:WEIGHT, default 1). Image i (prompts in order) uses the noise of seed
`--seed + i`, whatever the batch size. `--fuse OUT_DIR` also writes a full diffusers pipeline folder with
the weighted LoRAs merged into the denoiser (loadable with `from_pretrained(OUT_DIR)`); prompts are then optional.
"""

import argparse
import json
import logging
import os
import sys

from alignprop import config as configs, mixing, prompts
from alignprop.errors import UserError

logger = logging.getLogger("alignprop.generate")


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat the flag for several)")
    p.add_argument("--prompt_file", default="", help="one prompt per line, or a JSON list (alignprop/prompts.py)")
    p.add_argument("--prompt_set", default="", help=f"a prompt set: {', '.join(prompts.valid_names())}")
    p.add_argument("--lora", action="append", default=[], help="PATH or PATH:WEIGHT of a LoRA (repeatable: a mix)")
    p.add_argument("--seed", type=int, default=0, help="image i uses the initial noise of seed + i")
    p.add_argument("--batch_size", type=int, default=4, help="images per pipeline call")
    p.add_argument("--out", default="generated", help="folder for the PNG images and prompts.json")
    p.add_argument("--fuse", default="", help="also write a pipeline folder with the LoRAs merged in, here")
    p.add_argument("--device", default="", help="torch device (default: cuda if available, else cpu)")
    return p


def read_prompts(args):
    """The prompts of --prompt, then --prompt_file, then --prompt_set, in order."""
    out = list(args.prompt)
    if args.prompt_file:
        out += [p for p, _ in prompts.from_file(args.prompt_file).items]
    if args.prompt_set:
        out += [p for p, _ in prompts.make_prompt_set(args.prompt_set, "prompt_set").items]
    return out


def check(args, config):
    """Every flag and config mistake, reported before any model loads."""
    from alignprop import families

    configs.check_sampling(config)
    family, _ = families.resolve(config.model)
    loras = [mixing.parse_lora_spec(spec) for spec in args.lora]
    for path, _ in loras:
        mixing.lora.read_lora(family, path)  # readable, and a LoRA of this family, before any model loads
    texts = read_prompts(args)
    if not texts and not args.fuse:
        raise configs.ConfigError(
            "No prompts: give --prompt TEXT (repeatable), --prompt_file PATH or --prompt_set NAME."
        )
    if args.batch_size < 1:
        raise configs.ConfigError(f"--batch_size={args.batch_size} must be >= 1.")
    return loras, texts


def generate(args, config):
    loras, texts = check(args, config)

    import torch

    from alignprop import families, speed

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    speed.resolve_precision(config, device)
    family, source = families.resolve(config.model)
    components = families.load_frozen(family, source, config, device)
    height, width = family.image_size(components, config.sample.height, config.sample.width)
    family.check_size(components, height, width)
    for name, file, weight in mixing.load_mix(components.denoiser, family, loras):
        logger.info("LoRA %s: %s, weight %g", name, file, weight)
    pipe = family.pipeline(components)
    pipe.set_progress_bar_config(disable=True)
    s = config.sample
    if texts:
        images = mixing.generate(pipe, texts, args.seed, s.num_steps, s.guidance_scale, args.batch_size, height, width)
        os.makedirs(args.out, exist_ok=True)
        records = []
        for i, (text, image) in enumerate(zip(texts, pipe.numpy_to_pil(images))):
            file = f"{i:05d}.png"
            image.save(os.path.join(args.out, file))
            records.append({"file": file, "prompt": text, "seed": args.seed + i})
        settings = {
            "model": config.model.source,
            "family": config.model.family,
            "loras": [{"path": path, "weight": weight} for path, weight in loras],
            "num_steps": s.num_steps,
            "guidance_scale": s.guidance_scale,
            "height": height,
            "width": width,
            "mixed_precision": config.mixed_precision,
        }
        with open(os.path.join(args.out, "prompts.json"), "w") as f:
            json.dump({"settings": settings, "images": records}, f, indent=2)
        logger.info("%d images in %s", len(records), args.out)
    if args.fuse:
        mixing.export_fused(pipe, family, args.fuse)
        logger.info("diffusers pipeline folder (%d LoRAs merged): %s", len(loras), args.fuse)


def main(argv):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        spec, overrides, rest = configs.split_command_line(argv)
        args = parser().parse_args(rest)
        generate(args, configs.load(spec, overrides))
    except UserError as e:  # flag and config mistakes, missing or broken weights and LoRAs
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main(sys.argv[1:])
