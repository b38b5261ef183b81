"""HPSv2 / HPSv2.1 (Human Preference Score v2, Wu et al. 2023): image-text alignment with human preference.

The model is open_clip `ViT-H-14` fine-tuned on HPDv2. Score = cosine of the L2-normalized image and
prompt embeddings (the diagonal of image·text features, no logit scale), about 0.2-0.35 for real images.
AlignProp minimizes 1 − score; the reward is the score, which gives the same gradient. Images are
letterboxed as HPSv2's evaluation transform does (`ResizeMaxSize`: longer side to 224, bicubic, zero
padding), not centre-cropped: a 512x768 image is scored whole.

Weights: hub repo `xswu/HPSv2`, `HPS_v2_compressed.pt` (`hps`) or `HPS_v2.1_compressed.pt` (`hps_v21`),
a dict with a `state_dict` key, or a local copy at `config.reward.<name>.path` (`"random"`: random weights).
"""

import os

import torch
from torch import nn

from alignprop.errors import first_line, library_message
from alignprop.rewards import Reward, towers
from alignprop.rewards.loading import BadWeightsError, WeightsNotFoundError, hub_file
from alignprop.rewards.preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess
from alignprop.rng import seeded
from alignprop.speed import prepare_scorer

TINY = "tiny"
RANDOM = "random"  # `path`: seeded random weights of the architecture, nothing read


class HPSScorer(nn.Module):
    """(images [B,3,H,W] in [0, 1], prompts) -> HPS score [B]. Frozen, differentiable w.r.t. the images."""

    def __init__(self, model, tokenizer):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        size = model.visual.image_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        if size[0] != size[1]:
            raise ValueError(f"HPS scorer expects a square image tower, got image_size={size}.")
        self.image_size = size[0]
        # open_clip records the normalization of the pretrained tower; OpenAI's constants otherwise (HPSv2's).
        preprocess_cfg = getattr(model.visual, "preprocess_cfg", None) or {}
        self.mean = tuple(preprocess_cfg.get("mean", CLIP_MEAN))
        self.std = tuple(preprocess_cfg.get("std", CLIP_STD))
        self.requires_grad_(False)
        self.eval()

    def forward(self, images, prompts):
        param = next(self.parameters())
        pixels = clip_preprocess(images.to(param.dtype), self.image_size, self.mean, self.std, mode="letterbox")
        tokens = self.tokenizer(list(prompts)).to(param.device)
        out = self.model(pixels, tokens)  # output_dict=True: features already L2-normalized
        return (out["image_features"] * out["text_features"]).sum(-1)


def _read_problem(path):
    """Why torch.load cannot read `path` (corrupt, truncated, not a checkpoint), or None. Only on the error path."""
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle and zip errors
        return first_line(e)
    return None


def load_hps_checkpoint(model, path, fix=""):
    """Load an HPS checkpoint (`{'state_dict': ...}`) into an open_clip model, strictly; `fix` ends an error message."""
    import open_clip

    try:
        open_clip.load_checkpoint(model, path, strict=True, weights_only=True)
    except FileNotFoundError:
        raise WeightsNotFoundError(f"HPS checkpoint {path!r} does not exist. {fix}") from None
    except Exception as e:  # a truncated zip and a missing key both raise RuntimeError: tell them apart
        problem = _read_problem(path)
        if problem:
            raise BadWeightsError(
                f"HPS checkpoint {path!r} ({os.path.getsize(path)} bytes) could not be read: the file is corrupt, "
                f"truncated or not a checkpoint ({problem}). It is read with torch.load(weights_only=True), which "
                f"accepts tensors in plain containers only. {fix}"
            ) from e
        raise BadWeightsError(
            f"HPS checkpoint {path!r} does not fit the open_clip model it was loaded into "
            f"(is it an HPS checkpoint of this architecture?): {library_message(e)}\n{fix}"
        ) from e


def build_scorer(cfg, key, seed=0, device=None):
    """The scorer of `config.reward.<key>`: open_clip architecture `cfg.model` + the HPS checkpoint; `model='tiny'`
    builds a tiny random model (or loads `path` into it); `path='random'` gives the architecture seeded random
    weights, built on `device`, with nothing read."""
    import open_clip

    if cfg.model == TINY:
        model = towers.tiny_open_clip(seed)
        if cfg.path:
            load_hps_checkpoint(model, cfg.path, _fix(cfg, key))
        return HPSScorer(model, open_clip.SimpleTokenizer(context_length=model.context_length))
    random_weights = cfg.path == RANDOM
    if not random_weights:  # weights first: offline, fail before building a 1B-parameter model
        path = cfg.path or hub_file(cfg.repo, cfg.file, key=f"config.reward.{key}.path")
    # The architecture only: HPS fine-tunes all weights, so the LAION weights would be loaded for nothing.
    build_device = (device or "cpu") if random_weights else "cpu"
    with seeded(seed, build_device):
        model = open_clip.create_model(cfg.model, pretrained=None, output_dict=True, device=build_device)
    if not random_weights:
        load_hps_checkpoint(model, path, _fix(cfg, key))
    return HPSScorer(model, open_clip.get_tokenizer(cfg.model))


def problems(cfg, prefix):
    """The architecture must be one open_clip knows (checked before any model loads)."""
    if cfg.model == TINY:
        return []
    import open_clip

    if open_clip.get_model_config(cfg.model) is None:
        return [f"{prefix}.model={cfg.model!r}: not an open_clip architecture (HPSv2 uses 'ViT-H-14'; 'tiny' builds a "
                f"random tiny model); known: {', '.join(open_clip.list_models())}"]
    return []


def _fix(cfg, key):
    """How to point `config.reward.<key>` at a good checkpoint."""
    return (
        f"Point config.reward.{key}.path at a good copy of {cfg.file!r} of the hub repo {cfg.repo!r}"
        + ("." if cfg.path else ", or delete the broken file from the hub cache to download it again.")
    )


def _builder(key):
    def build(cfg, seed=0, device=None, dtype=None):
        scorer = prepare_scorer(build_scorer(cfg, key, seed, device), device, dtype)

        def reward_fn(images, prompts, metadata):
            return scorer(images, prompts).float(), {}

        return reward_fn

    return build


REWARDS = (
    Reward(
        "hps",
        "hps",
        _builder("hps"),
        "HPSv2: cosine of open_clip ViT-H-14 image and prompt embeddings (~0.25-0.35)",
        problems=problems,
    ),
    Reward(
        "hps_v21", "hps_v21", _builder("hps_v21"), "HPSv2.1: HPSv2's architecture, retrained weights", problems=problems
    ),
)
