"""LAION aesthetic predictor: CLIP ViT-L/14 image embedding (L2-normalized) -> MLP -> score.

Weights: the MLP `sac+logos+ava1-l14-linearMSE.pth` (published on the hub as
`trl-lib/ddpo-aesthetic-predictor` / `aesthetic-model.pth`) and the image tower of
`openai/clip-vit-large-patch14`; `clip_model="tiny"` or `"random"` builds the tower instead (rewards/towers.py).
"""

import os

import torch
from torch import nn

from alignprop.errors import first_line
from alignprop.rewards import Reward, towers
from alignprop.rewards.loading import BadWeightsError, WeightsNotFoundError, hub_file, load_pretrained
from alignprop.rewards.preprocess import clip_preprocess
from alignprop.rng import seeded
from alignprop.speed import prepare_scorer


class AestheticMLP(nn.Module):
    """The LAION MLP; layer indices match the published state dict (layers.0/2/4/6/7)."""

    def __init__(self, input_dim=768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds):
        return self.layers(embeds)


def load_mlp_state_dict(path, fix=""):
    """Read the MLP weights (a plain state dict saved with torch.save); `fix` ends any error message."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsNotFoundError(f"Aesthetic MLP weights {path!r} do not exist. {fix}") from None
    except Exception as e:  # pickle and zip errors of a corrupt, truncated or non-torch file
        raise BadWeightsError(
            f"Aesthetic MLP weights {path!r} ({os.path.getsize(path)} bytes) could not be read: the file is "
            f"corrupt, truncated or not a torch.save file ({first_line(e)}). {fix}"
        ) from e
    if not isinstance(state, dict):
        raise BadWeightsError(f"Aesthetic MLP weights {path!r} hold a {type(state).__name__}, not a state dict. {fix}")
    return state


def load_mlp(mlp, cfg, path):
    """Load the weights at `path` into `mlp` strictly; an error says which config key to point at a good copy."""
    fix = (
        f"Point config.reward.aesthetic.mlp_path at a good copy of the LAION MLP (sac+logos+ava1-l14-linearMSE.pth, "
        f"on the hub as {cfg.mlp_repo!r} / {cfg.mlp_file!r})"
        + ("." if cfg.mlp_path else ", or delete the broken file from the hub cache to download it again.")
    )
    state = load_mlp_state_dict(path, fix)
    try:
        mlp.load_state_dict(state, strict=True)
    except RuntimeError as e:  # missing, unexpected or mis-shaped keys
        raise BadWeightsError(f"Aesthetic MLP weights {path!r} do not match the LAION MLP: {e}\n{fix}") from e
    return mlp


class AestheticScorer(nn.Module):
    """images [B,3,H,W] in [0, 1] -> aesthetic score [B]. Frozen, differentiable w.r.t. the images."""

    def __init__(self, vision_model, mlp):
        super().__init__()
        self.vision_model = vision_model
        self.mlp = mlp
        self.image_size = vision_model.config.image_size
        self.requires_grad_(False)
        self.eval()

    def forward(self, images):
        dtype = next(self.parameters()).dtype
        pixels = clip_preprocess(images.to(dtype), self.image_size)
        embeds = self.vision_model(pixel_values=pixels).image_embeds
        embeds = embeds / embeds.norm(dim=-1, keepdim=True)
        return self.mlp(embeds).squeeze(-1)


def build_scorer(cfg, seed=0, device=None):
    """The scorer of `config.reward.aesthetic`: `clip_model` a hub id or folder, 'tiny' (a tiny random tower and
    MLP, or the MLP at `mlp_path`), or 'random' (CLIP ViT-L/14's architecture and the MLP with seeded random
    weights, built on `device`; nothing read)."""
    if cfg.clip_model == "random":
        vision = towers.vit_l14_vision_tower(seed, device)
        with seeded(seed + 1, device), torch.device(device or "cpu"):
            return AestheticScorer(vision, AestheticMLP(vision.config.projection_dim))
    if cfg.clip_model == "tiny":
        with seeded(seed):  # the tower, then the MLP, from one seed
            vision = towers.tiny_vision_tower()
            mlp = AestheticMLP(vision.config.projection_dim)
        if cfg.mlp_path:
            load_mlp(mlp, cfg, cfg.mlp_path)
        return AestheticScorer(vision, mlp)

    from transformers import CLIPVisionModelWithProjection

    vision = load_pretrained(CLIPVisionModelWithProjection, cfg.clip_model, key="config.reward.aesthetic.clip_model")
    path = cfg.mlp_path or hub_file(cfg.mlp_repo, cfg.mlp_file, key="config.reward.aesthetic.mlp_path")
    mlp = load_mlp(AestheticMLP(vision.config.projection_dim), cfg, path)
    return AestheticScorer(vision, mlp)


def build(cfg, seed=0, device=None, dtype=None):
    scorer = prepare_scorer(build_scorer(cfg, seed, device), device, dtype)

    def reward_fn(images, prompts, metadata):
        return scorer(images).float(), {}

    return reward_fn


REWARDS = (
    Reward("aesthetic", "aesthetic", build, "LAION aesthetic MLP on the CLIP ViT-L/14 image embedding (about 1-10)"),
)
