"""Image generation with diffusers' own `StableDiffusionPipeline` (users get exactly what diffusers gives)."""

import torch


def build_pipeline(components):
    """A `StableDiffusionPipeline` of loaded components; the scheduler is DDIM from the checkpoint's config."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=components.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def image_generators(seed, start, count):
    """One CPU generator per image, seeded `seed + index`: image i is the same whatever the batch size or device."""
    return [torch.Generator().manual_seed(seed + i) for i in range(start, start + count)]


@torch.no_grad()
def generate(pipe, prompts, seed, num_steps, guidance_scale, batch_size, height=None, width=None):
    """Images [N, H, W, 3] (numpy float in [0, 1]) for `prompts`, in order; image i uses seed `seed + i`."""
    import numpy as np

    images = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        out = pipe(
            batch,
            height=height,
            width=width,
            num_inference_steps=num_steps,
            guidance_scale=guidance_scale,
            generator=image_generators(seed, start, len(batch)),
            output_type="np",
        )
        images.append(out.images)
    return np.concatenate(images)


def export_fused(pipe, out_dir):
    """Merge the active LoRA adapters (at their `set_adapters` weights) into the UNet and save a plain pipeline.

    The folder loads with `StableDiffusionPipeline.from_pretrained(out_dir)` and needs no LoRA code.
    """
    if pipe.get_active_adapters():
        pipe.fuse_lora(components=["unet"])
        pipe.unload_lora_weights()  # drops the adapter modules; the fused weights stay
    pipe.save_pretrained(out_dir)
