"""The run folder: resolved config, metrics.jsonl, image grids, reward plot; and external trackers."""

import contextlib
import json
import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from alignprop.errors import UserError


class RunFolderError(UserError, OSError):
    """The run folder cannot be created or written (permissions, a file in the way, disk full); names the path."""


@contextlib.contextmanager
def _writing(path, what):
    """Turn an OSError while writing `path` into a RunFolderError that names the path and the config keys."""
    try:
        yield
    except OSError as e:
        where = f" (at {e.filename!r})" if e.filename and e.filename != path else ""
        raise RunFolderError(
            f"Cannot write {what} {path!r}{where}: {e.strerror or e}. The run folder is config.logdir/config.run_name "
            f"(or the folder of config.resume_from); point config.logdir at a writable folder with free space."
        ) from e


def unwritable(path):
    """Why a folder cannot be made or written at `path`, or None. Creates nothing (the run folder does, later)."""
    existing = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing!r} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing!r} is not writable by this user"
    return None


def problems(config):
    """The run folder must be creatable and writable: under `config.logdir`, or the resumed run's own folder."""
    from alignprop import checkpoints

    if config.resume_from:
        try:
            run_dir = os.path.dirname(os.path.abspath(checkpoints.resolve_resume(config.resume_from)))
        except FileNotFoundError:
            return []  # reported by checkpoints.problems
        why = unwritable(run_dir)
        return (
            [f"config.resume_from={config.resume_from!r}: a resumed run writes to its own folder, but {why}"]
            if why
            else []
        )
    why = unwritable(config.logdir)
    if why:
        return [
            f"config.logdir={config.logdir!r}: run folders cannot be created there: {why}; set it to a writable folder"
        ]
    return []


class RunFolder:
    """`logdir/run_name/` with config.json, metrics.jsonl, images/ and checkpoints; written by one process."""

    def __init__(self, path):
        self.path = path
        self.metrics_path = os.path.join(path, "metrics.jsonl")

    def create(self):
        # Fail now, not after hours of training, if the folder cannot be written.
        with _writing(self.path, "the run folder"):
            os.makedirs(os.path.join(self.path, "images"), exist_ok=True)
            probe = os.path.join(self.path, ".write_test")
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)

    def write_config(self, config, plan=None):
        data = {"config": json.loads(config.to_json_best_effort()), "batch_plan": plan and vars(plan)}
        path = os.path.join(self.path, "config.json")
        with _writing(path, "the run's config"), open(path, "w") as f:
            json.dump(data, f, indent=2)

    def log(self, record):
        with _writing(self.metrics_path, "the metrics file"), open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self):
        if not os.path.exists(self.metrics_path):
            return []
        with open(self.metrics_path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def image_path(self, name):
        return os.path.join(self.path, "images", name)


def to_pil(image):
    """[3,H,W] tensor in [0, 1] -> PIL image."""
    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def image_grid(images, captions, min_tile=128, columns=None):
    """A grid of [N,3,H,W] images in [0, 1], each with its caption below (tiny images are upscaled)."""
    n = len(images)
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    scale = max(1, math.ceil(min_tile / images.shape[-1]))
    tile_w, tile_h = images.shape[-1] * scale, images.shape[-2] * scale
    font = ImageFont.load_default(size=max(10, tile_w // 14))
    caption_h = int(font.size * 2.6)
    grid = Image.new("RGB", (columns * tile_w, rows * (tile_h + caption_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x, y = (i % columns) * tile_w, (i // columns) * (tile_h + caption_h)
        grid.paste(to_pil(image).resize((tile_w, tile_h), Image.NEAREST), (x, y))
        draw.multiline_text((x + 2, y + tile_h + 2), caption, fill="black", font=font)
    return grid


def _fit(text, width):
    return text if len(text) <= width else text[: width - 1] + "…"


def captions(prompts, rewards, width=24):
    return [f"{_fit(p, width)}\nreward {float(r):.4g}" for p, r in zip(prompts, rewards)]


def plot_rewards(records, path):
    """PNG plot of reward mean ± std over optimizer steps (nothing to plot: no file)."""
    if not records:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r["step"] for r in records])
    mean = np.array([r["reward_mean"] for r in records])
    std = np.array([r["reward_std"] for r in records])
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(steps, mean, marker="o", label="reward mean")
    ax.fill_between(steps, mean - std, mean + std, alpha=0.25, label="± std")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward")
    ax.set_title("Training reward")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def log_images(accelerator, tag, image, step):
    """Send a PIL image to the active trackers (tensorboard, wandb); main process only."""
    if image is None or not accelerator.is_main_process:
        return
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(tag, np.asarray(image), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.run.log({tag: wandb.Image(image)}, step=step)


def flat_config(config):
    """{'train.learning_rate': 0.001, ...}: scalars only, as tensorboard's hparams and wandb both accept."""
    out = {}

    def walk(prefix, node):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(name + ".", value)
            else:
                out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk("", json.loads(config.to_json_best_effort()))
    return out
