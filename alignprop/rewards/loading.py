"""Loading reward-model weights from the hub or a local path, with errors that say how to fix them."""

import os

from alignprop.errors import UserError


class WeightsNotFoundError(UserError, RuntimeError):
    """Weights are not on this machine and cannot be downloaded; the message names the key to point at a local copy."""


def hub_file(repo_id, filename, key):
    """Path of `filename` of hub repo `repo_id` (downloaded once into the hub cache)."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, filename)
    except Exception as e:
        raise WeightsNotFoundError(
            f"Could not get {filename!r} from the hub repo {repo_id!r} ({type(e).__name__}: {e}).\n"
            f"If this machine is offline, download the file elsewhere and set `{key}` to its local path."
        ) from e


def load_pretrained(cls, name_or_path, key, **kwargs):
    """`cls.from_pretrained(name_or_path)` with an actionable error when the weights cannot be had."""
    try:
        return cls.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as e:
        where = "local folder" if os.path.isdir(name_or_path) else "hub id or local folder"
        raise WeightsNotFoundError(
            f"Could not load {cls.__name__} from {key}={name_or_path!r} ({where}): {type(e).__name__}: {e}\n"
            f"If this machine is offline, download the model elsewhere and point `{key}` at a local copy."
        ) from e
