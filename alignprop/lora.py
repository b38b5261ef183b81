"""The LoRA: adding it to a denoiser, and its one reader and writer (the family's diffusers pipeline format).

A LoRA file is `pytorch_lora_weights.safetensors` as the family's pipeline writes it (keys
`<denoiser>.<module>.lora.down/up.weight` or `.lora_A/B.weight`, and the adapter metadata that gives
peft the right rank and alpha). It is named by a run folder (its final LoRA), a `checkpoint_N` folder, or
the `.safetensors` file itself.
"""

import os
import re

import torch

from alignprop.errors import UserError

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)$")


class LoRAPathError(UserError, FileNotFoundError):
    """A LoRA path names nothing loadable; the message names the path and what would work."""


class LoRAFileError(UserError, ValueError):
    """A LoRA file cannot be read or holds no LoRA for this family's denoiser."""


def problems(config):
    out = []
    if config.lora.rank < 1:
        out.append(f"config.lora.rank={config.lora.rank!r}: must be >= 1")
    if config.lora.alpha <= 0:
        out.append(f"config.lora.alpha={config.lora.alpha!r}: must be > 0")
    return out


def add_lora(denoiser, rank, alpha, targets, init="gaussian"):
    """Add a peft LoRA adapter ("default") on the `targets` modules; its parameters, in fp32 even when the
    frozen weights are fp16/bf16 (optimizer precision), are the only trainable ones. Returns the LoraConfig.
    lora_A is drawn from the global RNG: call it inside `rng.seeded`."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    lora_config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=init, target_modules=list(targets))
    denoiser.add_adapter(lora_config)
    cast_training_params(denoiser, dtype=torch.float32)
    return lora_config


def trainable_parameters(module):
    return [p for p in module.parameters() if p.requires_grad]


def lora_state_dict(denoiser, adapter="default"):
    """The denoiser's LoRA weights in diffusers' format (keys without the `<denoiser>.` prefix)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser, adapter_name=adapter))


def save_lora(family, denoiser, lora_config, directory):
    """Write the LoRA file into `directory`, loadable by `<family pipeline>.load_lora_weights(directory)`."""
    family.save_lora(directory, lora_state_dict(denoiser), lora_config)
    os.chmod(os.path.join(directory, LORA_WEIGHTS), 0o644)  # as every other file of a run folder


def lora_file(path):
    """The `.safetensors` file of a run folder, a `checkpoint_N` folder, or the file itself."""
    if not os.path.exists(path):
        raise LoRAPathError(
            f"LoRA path {path!r} does not exist; give a run folder, a checkpoint_N folder or a .safetensors file."
        )
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise LoRAPathError(f"LoRA path {path!r} is not a .safetensors file (written by alignprop's save_lora).")
        return path
    candidate = os.path.join(path, LORA_WEIGHTS)
    if os.path.isfile(candidate):
        return candidate
    hint = ""
    if not CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path))):
        from alignprop.checkpoints import list_checkpoints

        found = list_checkpoints(path)
        # A run folder gets its final LoRA only when training ends; its checkpoints are usable meanwhile.
        if found:
            hint = f" The run may not have finished; its latest checkpoint is {found[-1]!r}."
    raise LoRAPathError(f"LoRA path {path!r} is a folder without {LORA_WEIGHTS}.{hint}")


def read_lora(family, path):
    """(state dict in peft's keys without the denoiser prefix, adapter metadata or None) of a LoRA file."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    file = lora_file(path)
    try:
        out = family.pipeline_cls().lora_state_dict(file, return_lora_metadata=True)
        # (state, network alphas, metadata) from the SD/SDXL loaders, (state, metadata) from SD3's and FLUX's.
        state, metadata = out[0], out[-1]
    except Exception as e:  # safetensors and diffusers raise several types for a corrupt or foreign file
        from alignprop.errors import first_line

        raise LoRAFileError(f"LoRA file {file!r} cannot be read: it is corrupt, truncated or not a LoRA "
                            f"({first_line(e)}).") from e
    prefix = family.denoiser_name + "."
    own = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    if not own:
        # diffusers would load nothing and say nothing (e.g. a file written by `unet.save_lora_adapter`).
        raise LoRAFileError(f"LoRA file {file!r} holds no '{prefix}'-prefixed keys, so a {family.pipeline_class} "
                            f"would load nothing; it is not a LoRA of this model family ({family.description}).")
    return convert_unet_state_dict_to_peft(own), (metadata or {}).get(family.denoiser_name, metadata)


def load_into(denoiser, family, path, adapter="default"):
    """Load a LoRA file into the denoiser's existing adapter (resume); the shapes must fit."""
    from peft.utils import set_peft_model_state_dict

    state, _ = read_lora(family, path)
    result = set_peft_model_state_dict(denoiser, state, adapter_name=adapter)
    if getattr(result, "unexpected_keys", None):
        raise LoRAFileError(f"LoRA weights in {path} do not fit this denoiser: {result.unexpected_keys[:5]}")


def load_adapter(denoiser, family, path, adapter):
    """Load a LoRA file into the denoiser as a new adapter named `adapter` (mixing); returns the file."""
    file = lora_file(path)
    read_lora(family, file)  # a clear error for a corrupt file or one of another family (diffusers would load nothing)
    folder, name = os.path.split(file)
    denoiser.load_lora_adapter(folder, weight_name=name, prefix=family.denoiser_name, adapter_name=adapter)
    if adapter not in getattr(denoiser, "peft_config", {}):
        raise LoRAFileError(f"LoRA file {file!r} did not load into the denoiser as adapter {adapter!r}.")
    return file
