"""Loading Stable Diffusion components (real checkpoint or tiny random), freezing them and adding LoRA."""

import dataclasses
import os

import torch

from alignprop.errors import UserError

TINY = "tiny"

# The paper's LoRA targets: the attention projections of every attention block.
LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]


class ModelLoadError(UserError, RuntimeError):
    """Weights could not be found or read; the message says what was looked for and how to fix it."""


@dataclasses.dataclass
class Components:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object


def inference_dtype(mixed_precision):
    """The dtype of the frozen weights for accelerate's `mixed_precision` setting."""
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def _offline_hint(what, key):
    return (
        f"{what}\n"
        f"If this machine is offline, download the weights elsewhere (e.g. `huggingface-cli download <id>`) "
        f"and either copy the hub cache (HF_HOME) here or point `{key}` at a local copy."
    )


def load_components(model, revision=None, seed=0):
    """Components of an SD 1.x/2.x checkpoint: hub id, local diffusers folder, single file, or 'tiny'.

    The scheduler is always DDIM built from the checkpoint's own scheduler config, never from
    `DDIMScheduler()` defaults (linear betas, clip_sample=True: wrong for SD).
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    if model == TINY:
        from alignprop.tiny import build_tiny_components

        return Components(**build_tiny_components(seed))

    key = "config.pretrained.model"
    is_file = os.path.splitext(model)[1] in (".safetensors", ".ckpt")
    try:
        if is_file:
            if not os.path.isfile(model):
                raise ModelLoadError(f"{key}={model!r}: no such checkpoint file.")
            pipe = StableDiffusionPipeline.from_single_file(model, safety_checker=None, requires_safety_checker=False)
        else:
            looks_like_path = model.startswith(("/", ".", "~")) or model.count("/") > 1
            if looks_like_path and not os.path.isdir(os.path.expanduser(model)):
                raise ModelLoadError(f"{key}={model!r}: no such folder (a hub id looks like 'org/name').")
            model = os.path.expanduser(model)
            pipe = StableDiffusionPipeline.from_pretrained(
                model, revision=revision, safety_checker=None, requires_safety_checker=False
            )
    except ModelLoadError:
        raise
    except (OSError, ValueError, EnvironmentError) as e:
        where = "local file" if is_file else ("local folder" if os.path.isdir(model) else "hub id / local folder")
        raise ModelLoadError(
            _offline_hint(
                f"Could not load Stable Diffusion from {key}={model!r} (revision {revision!r}) as a {where}: "
                f"{type(e).__name__}: {e}",
                key,
            )
        ) from e
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return Components(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, scheduler)


def freeze_and_cast(components, device, dtype):
    """Freeze every weight and move the models to `device` in the inference dtype."""
    for module in (components.unet, components.vae, components.text_encoder):
        module.requires_grad_(False)
        module.eval()
        module.to(device, dtype=dtype)


def add_lora(unet, rank, alpha, init="gaussian", target_modules=LORA_TARGET_MODULES):
    """Add a peft LoRA adapter to the UNet; its parameters (kept in fp32) are the only trainable ones."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    lora_config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=init, target_modules=list(target_modules))
    unet.add_adapter(lora_config)
    # Trainable parameters in fp32 even when the frozen weights are fp16/bf16 (optimizer precision).
    cast_training_params(unet, dtype=torch.float32)
    return lora_config


def set_up_forward(unet, train):
    """Forward-pass options of the trained UNet: merged LoRA, block checkpointing (see config.train)."""
    if train.merged_lora:
        from alignprop.lora import merge_lora_forward

        merge_lora_forward(unet)
    if train.checkpoint_unet_blocks:
        unet.enable_gradient_checkpointing()
    if train.channels_last:
        unet.to(memory_format=torch.channels_last)


def nograd_unet(unet, train):
    """The module that runs the steps without gradients: the UNet itself, or a compiled view of it."""
    return torch.compile(unet) if train.compile_unet else unet


def trainable_parameters(module):
    return [p for p in module.parameters() if p.requires_grad]


def latent_shape(unet, vae, height=None, width=None):
    """(C, h, w) of the latents for an image of `height` x `width` (default: the UNet's native size)."""
    factor = vae_scale_factor(vae)
    h = (height or unet.config.sample_size * factor) // factor
    w = (width or unet.config.sample_size * factor) // factor
    return (unet.config.in_channels, h, w)


def vae_scale_factor(vae):
    return 2 ** (len(vae.config.block_out_channels) - 1)


def encode_prompts(text_encoder, tokenizer, prompts):
    """Prompt strings -> CLIP text embeddings [B, 77, D] (no gradients: the text encoder is frozen).

    Prompts longer than the tokenizer's limit are truncated, as diffusers' pipelines do.
    """
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(text_encoder.device)
    with torch.no_grad():
        return text_encoder(ids, return_dict=False)[0]


def check_resolution(components, height, width):
    """Image sizes must be multiples of the VAE's downsampling factor."""
    factor = vae_scale_factor(components.vae)
    for key, value in (("sample.height", height), ("sample.width", width)):
        if value is not None and value % factor:
            raise ValueError(f"config.{key}={value} is not a multiple of the VAE factor {factor}.")
