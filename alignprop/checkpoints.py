"""Checkpoints: the LoRA in diffusers' pipeline format plus accelerate's state, written atomically."""

import json
import os
import re
import shutil

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)$")
PROGRESS = "progress.json"


def lora_state_dict(unet):
    """The UNet's LoRA weights in diffusers' format (keys as `StableDiffusionPipeline.load_lora_weights` expects)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def save_lora(unet, lora_config, directory):
    """Write `pytorch_lora_weights.safetensors` loadable by `pipe.load_lora_weights(directory)`.

    The adapter metadata is saved too: without it a LoRA with alpha != rank loads with the wrong scale.
    """
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(
        directory,
        unet_lora_layers=lora_state_dict(unet),
        unet_lora_adapter_metadata=lora_config.to_dict(),
        safe_serialization=True,
    )


def load_lora(unet, directory):
    """Load LoRA weights saved by `save_lora` into a UNet that already has the (same) adapter."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(os.path.join(directory, LORA_WEIGHTS))
    state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(state), adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"LoRA weights in {directory} do not fit this UNet: {result.unexpected_keys[:5]}")


def register_hooks(accelerator, unet, lora_config):
    """Let accelerate's save_state/load_state write and read the LoRA in diffusers' format (not the whole UNet)."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            save_lora(accelerator.unwrap_model(unet), lora_config, output_dir)
        weights.clear()  # the full UNet is not saved

    def load_hook(models, input_dir):
        models.clear()  # nothing for accelerate to load: the LoRA is loaded here
        load_lora(accelerator.unwrap_model(unet), input_dir)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def list_checkpoints(run_dir):
    """Complete checkpoints of a run, oldest first (incomplete `.tmp` folders are ignored)."""
    if not os.path.isdir(run_dir):
        return []
    found = []
    for name in os.listdir(run_dir):
        m = CHECKPOINT_RE.match(name)
        if m and os.path.isfile(os.path.join(run_dir, name, PROGRESS)):
            found.append((int(m.group(1)), os.path.join(run_dir, name)))
    return [path for _, path in sorted(found)]


def resolve_resume(path):
    """A checkpoint folder, or the latest complete checkpoint of a run folder."""
    if CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path))):
        if not os.path.isfile(os.path.join(path, PROGRESS)):
            raise FileNotFoundError(f"config.resume_from={path!r} is not a complete checkpoint (no {PROGRESS}).")
        return path
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"config.resume_from={path!r} holds no complete checkpoint_N folder.")
    return found[-1]


def checkpoint_path(run_dir, step):
    return os.path.join(run_dir, f"checkpoint_{step}")


def save_checkpoint(accelerator, run_dir, step, progress, limit):
    """Save state to `run_dir/checkpoint_{step}` atomically (temp folder, then rename); keep the newest `limit`.

    All processes must call it (accelerate's save_state gathers); only the main process writes files.
    """
    final = checkpoint_path(run_dir, step)
    tmp = final + ".tmp"
    if accelerator.is_main_process and os.path.exists(tmp):
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, PROGRESS), "w") as f:
            json.dump(progress, f)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-limit]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path):
    """Restore state saved by `save_checkpoint`; returns its progress dict (step, epoch)."""
    accelerator.load_state(path)
    with open(os.path.join(path, PROGRESS)) as f:
        return json.load(f)
