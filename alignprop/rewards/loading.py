"""Loading reward-model weights from the hub or a local path, with errors that say how to fix them."""

import os

from alignprop.errors import UserError, library_message, offline_hint


class WeightsNotFoundError(UserError, RuntimeError):
    """Weights are not on this machine and cannot be downloaded; the message names the key to point at a local copy."""


class BadWeightsError(UserError, RuntimeError):
    """Weights were found but cannot be used: corrupt or truncated file, or the weights of another model."""


def hub_file(repo_id, filename, key):
    """Path of `filename` of hub repo `repo_id` (downloaded once into the hub cache)."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, filename)
    except Exception as e:  # offline, no such repo or file, network errors: huggingface_hub raises many types
        raise WeightsNotFoundError(
            f"Could not get {filename!r} from the hub repo {repo_id!r} ({library_message(e)}).\n"
            f"Check the repo and file names for typos. If this machine is offline, download the file elsewhere "
            f"and set `{key}` to its local path."
        ) from e


def load_pretrained(cls, name_or_path, key, **kwargs):
    """`cls.from_pretrained(name_or_path)` with an actionable error when the weights cannot be had or used.

    A model whose checkpoint lacks some of its parameters is an error: transformers would initialize them
    at random with only a warning, and a frozen reward model with random layers scores noise.
    """
    import torch

    is_model = isinstance(cls, type) and issubclass(cls, torch.nn.Module)
    local = os.path.isdir(name_or_path)
    try:
        if not is_model:
            return cls.from_pretrained(name_or_path, **kwargs)
        model, info = cls.from_pretrained(name_or_path, output_loading_info=True, **kwargs)
    except Exception as e:  # transformers, huggingface_hub and safetensors raise many unrelated types
        what = f"Could not load {cls.__name__} from {key}={name_or_path!r}"
        if local:
            raise BadWeightsError(
                f"{what} (a local folder): {library_message(e)}\n"
                f"The folder must be a complete `save_pretrained` folder of this kind of model (config.json and "
                f"weights), with no truncated file; re-download or re-save it, or point `{key}` at another copy."
            ) from e
        raise WeightsNotFoundError(
            f"{what} (no such local folder, so a hub id): {library_message(e)}\n{offline_hint(key)}"
        ) from e
    params = {name for name, _ in model.named_parameters()}
    missing = sorted(k for k in info.get("missing_keys", ()) if k in params)
    if missing:
        raise BadWeightsError(
            f"{key}={name_or_path!r} lacks {len(missing)} of the {len(params)} parameters of {cls.__name__} "
            f"(e.g. {', '.join(missing[:3])}): it holds the weights of another model or architecture. "
            f"Point `{key}` at a checkpoint of this model."
        )
    return model
