"""What a run shows: image grids, the reward plot, and the external trackers (wandb, tensorboard)."""

import json
import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from alignprop.errors import UserError, library_message


def wandb_problem(config):
    """Why wandb cannot log this run (no API key, and not offline), or None: checked before any model loads."""
    if config.log_with != "wandb" or os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return None
    if os.environ.get("WANDB_API_KEY"):
        return None
    import netrc

    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return None
    except (OSError, netrc.NetrcParseError):
        pass
    return ("config.log_with='wandb': no wandb API key on this machine (WANDB_API_KEY, or `wandb login`); to log "
            "without an account set WANDB_MODE=offline (files in the run folder, `wandb sync` them later)")


def problems(config):
    problem = wandb_problem(config)
    return [problem] if problem else []


def init_trackers(accelerator, config, run_dir):
    """Start the config's trackers; their own failures (network, account) as one message."""
    # wandb honours WANDB_MODE=offline/disabled; its files go to the run folder unless WANDB_DIR is set.
    os.environ.setdefault("WANDB_DIR", run_dir)
    try:
        accelerator.init_trackers(config.project_name, config=flat_config(config))
    except Exception as e:  # wandb and tensorboard raise many types (network, auth, permissions)
        raise TrackerError(f"config.log_with={config.log_with!r} could not start: {library_message(e)}\n"
                           f"For wandb without network use WANDB_MODE=offline; or --config.log_with=none.") from e


class TrackerError(UserError, RuntimeError):
    """An experiment tracker (wandb, tensorboard) could not start."""


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
