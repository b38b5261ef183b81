"""Loading a diffusers pipeline from a hub id, a local folder or a single file, with errors a user can act on."""

import os

import torch

from alignprop.errors import UserError, first_line, library_message, offline_hint

KEY = "config.model.source"


class ModelLoadError(UserError, RuntimeError):
    """Weights could not be found or read; the message says what was looked for and how to fix it."""


def single_file_problem(path, denoiser_prefix, required=()):
    """Why `path` cannot be a single-file checkpoint (unreadable, no denoiser weights, or lacking the
    `required` (prefix, what) keys of the family), or None if it may be one."""
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
    if not any(k.startswith(denoiser_prefix) for k in keys):
        return (
            f"it holds no denoiser weights (no '{denoiser_prefix}*' keys; its first keys: "
            f"{', '.join(map(str, keys[:3])) or 'none'}), so it is the checkpoint of another model"
        )
    for prefix, what in required:
        if not any(k.startswith(prefix) for k in keys):
            return (
                f"it has no '{prefix}*' keys ({what}), so it is the checkpoint of another model family "
                f"(config.model.family picks the family)"
            )
    return None


def _single_file_error(family, path, error):
    problem = single_file_problem(path, family.single_file_prefix, family.single_file_keys)
    if problem:
        return (
            f"{KEY}={path!r} is not a usable {family.description} checkpoint: {problem}.\n"
            f"Re-download the file (and compare its size with the source's), or point `{KEY}` at a diffusers "
            f"folder or a hub id."
        )
    return (
        f"Could not build {family.description} from the single-file checkpoint {KEY}={path!r}: "
        f"{library_message(error)}\n"
        f"diffusers reads the pipeline's config files (of the model it infers from the file's keys) from the hub. "
        f"If this machine is offline, either copy that model's hub cache (HF_HOME) here, or convert the file once "
        f"on a machine with network (`{family.pipeline_class}.from_single_file(PATH).save_pretrained(DIR)`) "
        f"and set `{KEY}` to DIR."
    )


def load_pipeline(family, source, **kwargs):
    """`family`'s diffusers pipeline from a Source of kind hub, folder or file; ModelLoadError says what failed."""
    pipeline_cls = family.pipeline_cls()
    if source.kind == "file":
        try:
            return pipeline_cls.from_single_file(source.name, **kwargs)
        except Exception as e:  # diffusers, safetensors, torch and huggingface_hub raise many unrelated types
            raise ModelLoadError(_single_file_error(family, source.name, e)) from e
    try:
        return pipeline_cls.from_pretrained(source.name, revision=source.revision, **kwargs)
    except Exception as e:  # as above
        what = f"Could not load {family.description} from {KEY}={source.name!r} (revision {source.revision!r})"
        if source.kind == "folder":
            raise ModelLoadError(
                f"{what}, a local folder: {library_message(e)}\n"
                f"The folder must be a complete diffusers pipeline folder (model_index.json and the component "
                f"folders) with no truncated file: re-download or re-save it (`pipe.save_pretrained(DIR)`), or "
                f"point `{KEY}` at a hub id or a single .safetensors/.ckpt file."
            ) from e
        raise ModelLoadError(
            f"{what}, not a local folder, so a hub id: {library_message(e)}\n{offline_hint(KEY)}"
        ) from e


VAE_KEY = "config.model.vae"


def load_vae(name, components):
    """An AutoencoderKL from a hub id or a local folder (a VAE folder, or a pipeline folder with vae/), in place
    of the checkpoint's; it must take the denoiser's latents."""
    from diffusers import AutoencoderKL

    path = os.path.expanduser(name)
    subfolder = "vae" if os.path.isfile(os.path.join(path, "vae", "config.json")) else None
    try:
        vae = AutoencoderKL.from_pretrained(path if os.path.isdir(path) else name, subfolder=subfolder)
    except Exception as e:  # diffusers, safetensors and huggingface_hub raise many unrelated types
        what = f"Could not load a VAE (AutoencoderKL) from {VAE_KEY}={name!r}"
        if os.path.isdir(path):
            raise ModelLoadError(
                f"{what}, a local folder: {library_message(e)}\nThe folder must hold a VAE (config.json and its "
                f"weights) or a pipeline with vae/; \"\" keeps the checkpoint's own VAE."
            ) from e
        raise ModelLoadError(
            f"{what}, not a local folder, so a hub id (e.g. madebyollin/sdxl-vae-fp16-fix): {library_message(e)}\n"
            f"{offline_hint(VAE_KEY)}"
        ) from e
    channels = components.denoiser.config.in_channels
    if vae.config.latent_channels != channels:
        raise ModelLoadError(
            f"{VAE_KEY}={name!r} has {vae.config.latent_channels} latent channels but the denoiser takes "
            f"{channels}: it is the VAE of another model family."
        )
    return vae
