"""LoRA mixing ("model soup") in weight-delta space: named adapters whose scaled deltas are summed.

A LoRA changes a weight by ΔW = (alpha / rank)·B·A. Mixing must interpolate these deltas: with
diffusers' `set_adapters(names, weights)` every adapted layer computes W·x + Σᵢ wᵢ·ΔWᵢ·x, so
weights [c] give c·ΔW (the base model mixed with one LoRA at c) and weights [1−c, c] give
(1−c)·ΔW₁ + c·ΔW₂. Interpolating the A and B factors separately (the official AlignProp code) gives
c²·ΔW and cross terms B₁A₂, B₂A₁ between two LoRAs instead (REFERENCE.md, bug #5).

A LoRA is named by a run folder (its final `pytorch_lora_weights.safetensors`), a `checkpoint_N`
folder, or the `.safetensors` file itself; files written by `alignprop.checkpoints.save_lora`.
"""

import math
import os

from alignprop.checkpoints import CHECKPOINT_RE, LORA_WEIGHTS, list_checkpoints

# Adapter names of a two-LoRA soup (`soup_weights` gives their weights).
SOUP_ADAPTERS = ("lora_a", "lora_b")


class LoRAPathError(FileNotFoundError):
    """A LoRA path names nothing loadable; the message names the path and what would work."""


def lora_file(path):
    """The `.safetensors` file of a run folder, a `checkpoint_N` folder, or the file itself."""
    if not os.path.exists(path):
        raise LoRAPathError(
            f"LoRA path {path!r} does not exist; give a run folder, a checkpoint_N folder or a .safetensors file."
        )
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise LoRAPathError(f"LoRA path {path!r} is not a .safetensors file (written by save_lora).")
        return path
    candidate = os.path.join(path, LORA_WEIGHTS)
    if os.path.isfile(candidate):
        return candidate
    hint = ""
    if not CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path))):
        found = list_checkpoints(path)
        # A run folder gets its final LoRA only when training ends; its checkpoints are usable meanwhile.
        if found:
            hint = f" The run may not have finished; its latest checkpoint is {found[-1]!r}."
    raise LoRAPathError(f"LoRA path {path!r} is a folder without {LORA_WEIGHTS}.{hint}")


def parse_lora_spec(spec):
    """'PATH:WEIGHT' -> (PATH, WEIGHT); 'PATH' alone -> (PATH, 1.0)."""
    path, sep, weight_text = spec.rpartition(":")
    if not sep:
        return spec, 1.0
    try:
        weight = float(weight_text)
    except ValueError:
        return spec, 1.0  # a colon inside the path, no weight
    if not math.isfinite(weight):
        raise ValueError(f"--lora={spec!r}: the weight {weight_text!r} must be a finite number (e.g. '{path}:0.5').")
    if not path:
        raise ValueError(f"--lora={spec!r} names no path; write PATH or PATH:WEIGHT.")
    return path, weight


def _unet(target):
    return target.unet if hasattr(target, "unet") else target


def load_lora(target, path, adapter_name):
    """Load the LoRA at `path` into a `StableDiffusionPipeline` or UNet as the adapter `adapter_name`.

    The adapter metadata in the file gives peft the right rank and alpha (so the right scale).
    """
    from diffusers import StableDiffusionPipeline

    file = lora_file(path)
    state_dict, network_alphas, metadata = StableDiffusionPipeline.lora_state_dict(file, return_lora_metadata=True)
    if not any(k.startswith("unet.") for k in state_dict):
        # diffusers would load nothing and say nothing (e.g. a file written by `unet.save_lora_adapter`).
        raise ValueError(
            f"LoRA file {file!r} holds no 'unet.'-prefixed keys, so a pipeline would load nothing; "
            f"save it with alignprop.checkpoints.save_lora (StableDiffusionPipeline.save_lora_weights)."
        )
    if hasattr(target, "load_lora_weights"):
        # The pipeline's own loader, from the file: a state dict passed in memory would lose the metadata.
        folder, name = os.path.split(file)
        target.load_lora_weights(folder, weight_name=name, adapter_name=adapter_name)
    else:
        StableDiffusionPipeline.load_lora_into_unet(
            state_dict, network_alphas, target, adapter_name=adapter_name, metadata=metadata
        )
    if adapter_name not in getattr(_unet(target), "peft_config", {}):
        raise RuntimeError(f"LoRA file {file!r} did not load into the UNet as adapter {adapter_name!r}.")
    return file


def set_mix(target, adapter_names, weights):
    """Activate `adapter_names` with `weights`: every adapted layer uses W + Σᵢ wᵢ·ΔWᵢ (ΔW-space mixing)."""
    if len(adapter_names) != len(weights):
        raise ValueError(f"{len(adapter_names)} adapters {adapter_names} but {len(weights)} weights {weights}.")
    if hasattr(target, "load_lora_weights"):
        target.set_adapters(list(adapter_names), adapter_weights=[float(w) for w in weights])
    else:
        target.set_adapters(list(adapter_names), weights=[float(w) for w in weights])


def soup_weights(coefficient, two_loras):
    """Adapter weights of a soup at `coefficient` c: [c] (LoRA A with the base model), or [c, 1 − c] (A with B).

    c is the weight of LoRA A; the other end (LoRA B, or the base model) gets 1 − c, so c = 0 is LoRA B
    (or the base model) and c = 1 is LoRA A.
    """
    c = float(coefficient)
    return [c, 1.0 - c] if two_loras else [c]
