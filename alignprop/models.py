"""Loading Stable Diffusion components (real checkpoint or tiny random), freezing them and adding LoRA."""

import dataclasses
import logging
import os
import weakref

import torch

from alignprop.errors import ConfigError, UserError, first_line, library_message, offline_hint

logger = logging.getLogger(__name__)

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


# Keys of the UNet in an original (LDM/A1111-style) single-file SD checkpoint.
SINGLE_FILE_UNET_PREFIX = "model.diffusion_model."


def single_file_problem(path):
    """Why `path` cannot be a single-file SD checkpoint (unreadable, or no UNet weights), or None if it may be one."""
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                keys = list(f.keys())
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
            keys = list(state) if isinstance(state, dict) else []
    except Exception as e:  # safetensors and pickle raise many types for a file that is not a checkpoint
        return (
            f"the file ({os.path.getsize(path)} bytes) cannot be read: it is corrupt, truncated or not a "
            f"checkpoint ({first_line(e)})"
        )
    if not any(k.startswith(SINGLE_FILE_UNET_PREFIX) for k in keys):
        return (
            f"it holds no Stable Diffusion UNet weights (no '{SINGLE_FILE_UNET_PREFIX}*' keys; its first keys: "
            f"{', '.join(map(str, keys[:3])) or 'none'}), so it is the checkpoint of another model"
        )
    return None


def _single_file_error(path, error, key):
    """The message of a failed `from_single_file`: what is wrong with the file, or why a sound file did not load."""
    problem = single_file_problem(path)
    if problem:
        return (
            f"{key}={path!r} is not a usable Stable Diffusion checkpoint: {problem}.\n"
            f"Re-download the file (and compare its size with the source's), or point `{key}` at a diffusers "
            f"folder or a hub id."
        )
    return (
        f"Could not build Stable Diffusion from the single-file checkpoint {key}={path!r}: {library_message(error)}\n"
        f"diffusers reads the pipeline's config files (of the model it infers from the file's keys) from the hub. "
        f"If this machine is offline, either copy that model's hub cache (HF_HOME) here, or convert the file once "
        f"on a machine with network (`StableDiffusionPipeline.from_single_file(PATH).save_pretrained(DIR)`) "
        f"and set `{key}` to DIR."
    )


def load_components(model, revision=None, seed=0, random_weights=False, device=None):
    """Components of an SD 1.x/2.x checkpoint: hub id, local diffusers folder, single file, or 'tiny'.

    The scheduler is always DDIM built from the checkpoint's own scheduler config, never from
    `DDIMScheduler()` defaults (linear betas, clip_sample=True: wrong for SD). With `random_weights`,
    SD 1.5's architecture with seeded random weights is built on `device` instead (nothing is read).
    """
    if model == TINY:
        from alignprop.tiny import build_tiny_components

        return Components(**build_tiny_components(seed))
    if random_weights:
        from alignprop.random_init import build_sd15_components

        return Components(**build_sd15_components(seed, device))
    # Imported here: the pipeline module pulls in much of diffusers and transformers (seconds).
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    key = "config.pretrained.model"
    if os.path.splitext(model)[1] in (".safetensors", ".ckpt"):
        if not os.path.isfile(model):
            raise ModelLoadError(f"{key}={model!r}: no such checkpoint file.")
        try:
            pipe = StableDiffusionPipeline.from_single_file(model, safety_checker=None, requires_safety_checker=False)
        except Exception as e:  # diffusers, safetensors, torch and huggingface_hub raise many unrelated types
            raise ModelLoadError(_single_file_error(model, e, key)) from e
    else:
        looks_like_path = model.startswith(("/", ".", "~")) or model.count("/") > 1
        if looks_like_path and not os.path.isdir(os.path.expanduser(model)):
            raise ModelLoadError(f"{key}={model!r}: no such folder (a hub id looks like 'org/name').")
        model = os.path.expanduser(model)
        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                model, revision=revision, safety_checker=None, requires_safety_checker=False
            )
        except Exception as e:  # as above
            what = f"Could not load Stable Diffusion from {key}={model!r} (revision {revision!r})"
            if os.path.isdir(model):
                raise ModelLoadError(
                    f"{what}, a local folder: {library_message(e)}\n"
                    f"The folder must be a complete diffusers pipeline folder (model_index.json, unet/, vae/, "
                    f"text_encoder/, tokenizer/, scheduler/) with no truncated file: re-download or re-save it "
                    f"(`pipe.save_pretrained(DIR)`), or point `{key}` at a hub id or a single .safetensors/.ckpt file."
                ) from e
            raise ModelLoadError(
                f"{what}, not a local folder, so a hub id: {library_message(e)}\n{offline_hint(key)}"
            ) from e
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return Components(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, scheduler)


def set_torch_flags(config):
    """The global torch settings a config asks for: TF32 matmuls and convolutions, cuDNN's algorithm search."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = config.allow_tf32
    torch.backends.cudnn.benchmark = config.train.cudnn_benchmark


def load_frozen_components(config, device):
    """The config's Stable Diffusion, checked against its image size, frozen and cast to its inference dtype.

    Returns (components, dtype). With `config.random_weights`, SD 1.5 with random weights built on `device`.
    """
    dtype = inference_dtype(config.mixed_precision)
    components = load_components(
        config.pretrained.model, config.pretrained.revision, seed=config.seed,
        random_weights=config.random_weights, device=device,
    )
    check_resolution(components, config.sample.height, config.sample.width)
    freeze_and_cast(components, device, dtype)
    return components, dtype


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


# The UNet's repeated blocks, compiled one by one with train.compile_scope="blocks".
UNET_BLOCKS = ("Transformer2DModel", "ResnetBlock2D")


def compile_models(components, train):
    """torch.compile what config.train asks for; returns the module that runs the steps without gradients.

    `compile_grad_steps` compiles the UNet in place, so every call of it (through DDP too, forward and
    backward) runs compiled; `compile_unet` alone compiles a view used only for the no-grad steps.
    With `compile_scope="blocks"` (regional compilation), each of the UNet's attention and ResNet blocks
    is compiled in place instead, for every call: blocks of the same shape share one graph, and the
    glue between blocks (input/output convolutions, time embedding, resampling) runs eagerly.
    `compile_decoder` compiles the VAE decoder in place. PyTorch caches compiled code on disk
    (TORCHINDUCTOR_CACHE_DIR) for later runs of the same shapes. On the CPU, inductor is skipped.
    Each batch shape (training, evaluation) compiles once.
    """
    device = next(components.unet.parameters()).device
    if device.type == "cpu" and train.compile_backend == "inductor":
        # Minutes of C++ compilation for little gain: the compile switches are for GPUs.
        logger.info("torch.compile skipped on the CPU (config.train.compile_*)")
        return components.unet
    # Static shapes: evaluation's batch gets its own graph instead of turning the training graph into a
    # slower shape-generic one (what torch.compile does by default at the second batch size it sees).
    options = {"mode": train.compile_mode, "backend": train.compile_backend, "dynamic": False}
    # Fraction of the activations the compiled backward may keep (1: all the partitioner wants; lower:
    # it recomputes the cheapest ops, e.g. normalizations and pointwise ops, instead of storing them).
    torch._functorch.config.activation_memory_budget = train.compile_memory_budget
    if train.compile_decoder:
        components.vae.decoder.compile(**options)
    if train.compile_scope == "blocks" and (train.compile_unet or train.compile_grad_steps):
        blocks = [m for m in components.unet.modules() if type(m).__name__ in UNET_BLOCKS]
        # One graph per (block shape, grad mode, batch size): SD 1.5 has ~14 ResNet shapes, more than
        # Dynamo's default of 8 graphs per function, after which it would run the rest eagerly.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 128)
        for block in blocks:
            block.compile(**options)
        return components.unet
    if train.compile_grad_steps:
        components.unet.compile(**options)
        return components.unet
    return torch.compile(components.unet, **options) if train.compile_unet else components.unet


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

    Prompts longer than the tokenizer's limit are truncated, as diffusers' pipelines do; the first
    truncation of a run is logged (see `_report_truncation`).
    """
    prompts = list(prompts)
    _report_truncation(tokenizer, prompts)
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(text_encoder.device)
    with torch.no_grad():
        return text_encoder(ids, return_dict=False)[0]


# Tokenizers that have reported a truncated prompt: one warning per run (one tokenizer), not one per batch.
_TRUNCATION_REPORTED = weakref.WeakSet()


def _report_truncation(tokenizer, prompts):
    """Log once per tokenizer how many tokens the longest over-long prompt of the first such batch loses."""
    if tokenizer in _TRUNCATION_REPORTED:
        return
    limit = tokenizer.model_max_length
    # verbose=False: no transformers warning of its own about the length (it would come with no count).
    lengths = [len(ids) for ids in tokenizer(prompts, truncation=False, verbose=False).input_ids]
    over = [(n - limit, prompt) for n, prompt in zip(lengths, prompts) if n > limit]
    if not over:
        return
    _TRUNCATION_REPORTED.add(tokenizer)
    dropped, prompt = max(over, key=lambda item: item[0])
    shown = prompt if len(prompt) <= 80 else prompt[:77] + "..."
    logger.warning(
        "Prompt %r is %d tokens long, over the text encoder's limit of %d (start and end tokens included): "
        "its last %d tokens are dropped (%d prompt(s) of this batch are truncated). Later over-long prompts "
        "are truncated the same way without another warning.",
        shown, dropped + limit, limit, dropped, len(over),
    )


def check_resolution(components, height, width):
    """Image sizes must be multiples of the VAE's downsampling factor."""
    factor = vae_scale_factor(components.vae)
    for key, value in (("sample.height", height), ("sample.width", width)):
        if value is not None and value % factor:
            lower = max(factor, value // factor * factor)
            raise ConfigError(
                f"config.{key}={value} is not a multiple of this VAE's downsampling factor {factor}; "
                f"use e.g. {lower} or {lower + factor}."
            )
