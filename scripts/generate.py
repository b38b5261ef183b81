"""Generate PNG images with the base model plus zero or more LoRAs, through diffusers' StableDiffusionPipeline.

    python scripts/generate.py --lora logs/aesthetic/RUN:1.0 --prompt "a photo of an owl" --prompt "a koala" \
        --out generated/aesthetic
    python scripts/generate.py --lora logs/aesthetic/RUN:0.5 --lora logs/hps/RUN:0.5 \
        --prompt_set eval_simple_animals --out generated/soup            # two LoRAs mixed in ΔW space
    python scripts/generate.py --lora logs/aesthetic/RUN/checkpoint_8:1.0 --fuse exported/aesthetic_sd15
    python scripts/generate.py --model tiny --prompt_file prompts.txt --num_steps 8 --out /tmp/gen   # offline CPU

A LoRA is a run folder, a checkpoint_N folder or a .safetensors file, with an optional weight (PATH:WEIGHT,
default 1). Image i (prompts in order) uses the noise of seed `--seed + i`, whatever the batch size.
`--fuse OUT_DIR` also writes a full diffusers pipeline folder with the weighted LoRAs merged into the UNet,
loadable with `StableDiffusionPipeline.from_pretrained(OUT_DIR)` (or `--model OUT_DIR`); prompts are then optional.
"""

import json
import os

from absl import app, flags, logging

from alignprop import mixing, prompts

flags.DEFINE_string("model", "runwayml/stable-diffusion-v1-5", "Hub id, local diffusers folder, single file, or 'tiny'.")
flags.DEFINE_string("revision", "main", "Hub revision of --model.")
flags.DEFINE_integer("tiny_seed", 42, "Seed of the random weights of --model tiny (config.seed of the tiny training run).")
flags.DEFINE_multi_string("prompt", [], "A prompt (repeat the flag for several).")
flags.DEFINE_string("prompt_file", "", "Text file with one prompt per line, or a JSON list (see alignprop/prompts.py).")
flags.DEFINE_string("prompt_set", "", f"A prompt set: {', '.join(prompts.valid_names())}.")
flags.DEFINE_multi_string("lora", [], "PATH or PATH:WEIGHT of a LoRA (repeat the flag to mix several).")
flags.DEFINE_integer("seed", 0, "Image i uses the initial noise of seed + i.")
flags.DEFINE_integer("num_steps", 50, "DDIM steps.")
flags.DEFINE_float("guidance_scale", 7.5, "Classifier-free guidance weight (<= 1 disables guidance).")
flags.DEFINE_integer("batch_size", 4, "Images per pipeline call.")
flags.DEFINE_integer("height", None, "Image height in pixels (default: the model's native size).")
flags.DEFINE_integer("width", None, "Image width in pixels (default: the model's native size).")
flags.DEFINE_string("out", "generated", "Folder for the PNG images and prompts.json.")
flags.DEFINE_string("fuse", "", "Also write a diffusers pipeline folder with the LoRAs merged into the UNet here.")
flags.DEFINE_string("device", "", "Torch device (default: cuda if available, else cpu).")
flags.DEFINE_enum("mixed_precision", None, ["no", "fp16", "bf16"], "Weights dtype (default: fp16 on CUDA, no on CPU).")
FLAGS = flags.FLAGS


def read_prompts():
    """The prompts of --prompt, then --prompt_file, then --prompt_set, in order."""
    out = list(FLAGS.prompt)
    if FLAGS.prompt_file:
        out += [p for p, _ in prompts.from_file(FLAGS.prompt_file).items]
    if FLAGS.prompt_set:
        try:
            prompts.check_name(FLAGS.prompt_set)
        except prompts.PromptError:
            raise prompts.PromptError(
                f"--prompt_set={FLAGS.prompt_set!r} is not a prompt set; valid: {', '.join(prompts.valid_names())}."
            ) from None
        out += [p for p, _ in prompts.make_prompt_set(FLAGS.prompt_set).items]
    return out


def check_flags():
    """Every flag mistake, reported before any model loads (a typo fails in a second, not after loading SD)."""
    loras = [mixing.parse_lora_spec(spec) for spec in FLAGS.lora]
    for path, _ in loras:
        mixing.lora_file(path)
    texts = read_prompts()
    if not texts and not FLAGS.fuse:
        raise ValueError("No prompts: give --prompt TEXT (repeatable), --prompt_file PATH or --prompt_set NAME.")
    for name in ("num_steps", "batch_size"):
        if FLAGS[name].value < 1:
            raise ValueError(f"--{name}={FLAGS[name].value} must be >= 1.")
    return loras, texts


def main(_):
    try:
        loras, texts = check_flags()
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(str(e)) from None

    import torch

    from alignprop import generation, models

    device = torch.device(FLAGS.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = FLAGS.mixed_precision or ("fp16" if device.type == "cuda" else "no")
    if precision == "fp16" and device.type == "cpu":
        raise SystemExit("--mixed_precision=fp16 needs a CUDA GPU; use 'no' or 'bf16' on the CPU.")
    components = models.load_components(FLAGS.model, FLAGS.revision, seed=FLAGS.tiny_seed)
    models.freeze_and_cast(components, device, models.inference_dtype(precision))
    pipe = generation.build_pipeline(components)
    names = [f"lora_{i}" for i in range(len(loras))]
    for name, (path, weight) in zip(names, loras):
        file = mixing.load_lora(pipe, path, name)
        logging.info("LoRA %s: %s, weight %g", name, file, weight)
    if loras:
        mixing.set_mix(pipe, names, [weight for _, weight in loras])

    if texts:
        images = generation.generate(
            pipe, texts, FLAGS.seed, FLAGS.num_steps, FLAGS.guidance_scale, FLAGS.batch_size, FLAGS.height, FLAGS.width
        )
        os.makedirs(FLAGS.out, exist_ok=True)
        records = []
        for i, (text, image) in enumerate(zip(texts, pipe.numpy_to_pil(images))):
            file = f"{i:05d}.png"
            image.save(os.path.join(FLAGS.out, file))
            records.append({"file": file, "prompt": text, "seed": FLAGS.seed + i})
        settings = {
            "model": FLAGS.model,
            "loras": [{"path": path, "weight": weight} for path, weight in loras],
            "num_steps": FLAGS.num_steps,
            "guidance_scale": FLAGS.guidance_scale,
            "mixed_precision": precision,
        }
        with open(os.path.join(FLAGS.out, "prompts.json"), "w") as f:
            json.dump({"settings": settings, "images": records}, f, indent=2)
        logging.info("%d images in %s", len(records), FLAGS.out)
    if FLAGS.fuse:
        generation.export_fused(pipe, FLAGS.fuse)
        logging.info("diffusers pipeline folder (%d LoRAs merged): %s", len(loras), FLAGS.fuse)


if __name__ == "__main__":
    app.run(main)
