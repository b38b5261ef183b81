"""Checkpoints: the LoRA in the family's pipeline format plus accelerate's state, written atomically."""

import json
import os
import shutil

from alignprop import lora
from alignprop.lora import CHECKPOINT_RE

PROGRESS = "progress.json"


def register_hooks(accelerator, family, denoiser, lora_config):
    """Let accelerate's save_state/load_state write and read the LoRA file (not the whole denoiser)."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            lora.save_lora(family, accelerator.unwrap_model(denoiser), lora_config, output_dir)
        weights.clear()  # the full denoiser is not saved

    def load_hook(models, input_dir):
        models.clear()  # nothing for accelerate to load: the LoRA is loaded here
        lora.load_into(accelerator.unwrap_model(denoiser), family, input_dir)

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


# Keys a resumed run cannot change: the checkpoint's LoRA has their shapes, and was trained on that model.
FROZEN_ON_RESUME = ("model.family", "model.source", "model.revision", "model.prediction_type", "lora.rank",
                    "lora.alpha", "lora.targets")


def problems(config):
    """`config.resume_from` must name a complete, readable checkpoint (or a run folder that holds one), and the
    config may not change what the checkpoint's LoRA depends on; all checked before any model loads."""
    if not config.resume_from:
        return []
    if not os.path.exists(config.resume_from):
        return [f"config.resume_from={config.resume_from!r}: no such run or checkpoint folder"]
    try:
        path = resolve_resume(config.resume_from)
    except FileNotFoundError as e:
        return [f"{e} Give a checkpoint_N folder or a run folder that holds one, or '' to start afresh."]
    out = []
    damaged = [(name, why) for name in sorted(os.listdir(path)) if (why := file_problem(os.path.join(path, name)))]
    if damaged:
        earlier = [c for c in list_checkpoints(os.path.dirname(os.path.abspath(path))) if c != os.path.abspath(path)]
        offer = (f" The previous complete checkpoint is {earlier[-1]!r}: resume with "
                 f"--config.resume_from={earlier[-1]}."
                 if earlier else " The run has no earlier checkpoint.")
        out.append(f"config.resume_from={config.resume_from!r}: {os.path.basename(path)} is damaged: "
                   + "; ".join(f"{name} {why}" for name, why in damaged) + "." + offer)
    record = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    if os.path.isfile(record):
        with open(record) as f:
            saved = json.load(f).get("config", {})
        for key in FROZEN_ON_RESUME:
            then, now = _lookup(saved, key), json.loads(json.dumps(_lookup(config, key)))
            if then != now:
                out.append(f"config.{key}={now!r}: the run being resumed ({record}) has {key}={then!r}, and its "
                           f"checkpoints' LoRA depends on it; resume with the run's value, or start a new run")
    return out


def _lookup(tree, key):
    for part in key.split("."):
        tree = tree.get(part) if hasattr(tree, "get") else None
    return list(tree) if isinstance(tree, tuple) else tree


def _zip_signature(path):
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def file_problem(path):
    """Why a checkpoint file cannot be read (truncated, corrupt), or None; reads formats without running them."""
    import pickletools
    import zipfile

    size = os.path.getsize(path) if os.path.isfile(path) else 0
    try:
        if path.endswith(".safetensors"):
            with open(path, "rb") as f:
                header_size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(header_size))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if 8 + header_size + end != size:
                return f"({size} bytes) is truncated: its header describes {8 + header_size + end} bytes"
        elif path.endswith((".bin", ".pt", ".pth")) or (path.endswith(".pkl") and _zip_signature(path)):
            with zipfile.ZipFile(path) as z:  # torch.save's format (accelerate saves its .pkl files with it too)
                bad = z.testzip()
            if bad:
                return f"({size} bytes) is corrupt (its member {bad} fails its checksum)"
        elif path.endswith(".pkl"):
            with open(path, "rb") as f:
                for _ in pickletools.genops(f):
                    pass
        elif path.endswith(".json"):
            with open(path) as f:
                json.load(f)
    except Exception as e:  # zip, pickle and json readers raise many types for a damaged file
        return f"({size} bytes) cannot be read: it is truncated or corrupt ({type(e).__name__}: {e})"
    return None


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


def step_of(checkpoint):
    """N of a `checkpoint_N` folder."""
    return int(CHECKPOINT_RE.match(os.path.basename(os.path.normpath(checkpoint))).group(1))


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
