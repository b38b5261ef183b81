"""Reward models built from configs with seeded random weights: tiny ones (`tiny`, for the CPU and the tests)
and full-size architectures (`random`, the compute and memory of the real models; nothing downloaded).

The full-size config is the published one of openai/clip-vit-large-patch14 (the aesthetic reward's image
tower); open_clip ships its architectures (ViT-H-14 for HPS) in its package.
"""

import copy

import torch

from alignprop.rng import seeded
from alignprop.tokenizers import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, tiny_clip_text_config

CLIP_VIT_L14_VISION_CONFIG = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
    patch_size=14, projection_dim=768, hidden_act="quick_gelu",
)
# A tiny vision tower: 32x32 images in 8x8 patches.
TINY_VISION = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32,
                   patch_size=8)
# A tiny open_clip CLIP in open_clip's model-config schema (model_configs/*.json): the HPS reward's `tiny`
# model, and the config tests register with `open_clip.add_model_config` to test the real loader.
TINY_OPEN_CLIP_CONFIG = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, layers=2, width=32, head_width=16, patch_size=8),
    text_cfg=dict(context_length=CLIP_MAX_LENGTH, vocab_size=CLIP_VOCAB_SIZE, width=32, heads=4, layers=2),
)


def tiny_clip_config():
    """A tiny transformers CLIP (text + vision) config."""
    from transformers import CLIPConfig

    return CLIPConfig(text_config=tiny_clip_text_config(), vision_config=TINY_VISION, projection_dim=32)


def tiny_clip(seed=0):
    from transformers import CLIPModel

    with seeded(seed):
        return CLIPModel(tiny_clip_config())


def tiny_vision_tower():
    """The tiny CLIP's vision tower with its projection (as `CLIPVisionModelWithProjection`); its weights
    come from the global RNG: call it inside `rng.seeded` (the aesthetic reward seeds it and its MLP at once)."""
    from transformers import CLIPVisionModelWithProjection

    full = tiny_clip_config()
    vision_config = full.vision_config
    vision_config.projection_dim = full.projection_dim
    return CLIPVisionModelWithProjection(vision_config)


def vit_l14_vision_tower(seed=0, device=None):
    """CLIP ViT-L/14's vision tower with its projection (the aesthetic reward's), seeded random weights, on `device`."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with seeded(seed, device), torch.device(device or "cpu"):
        return CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VIT_L14_VISION_CONFIG))


def tiny_open_clip(seed=0):
    """A tiny open_clip CLIP (output_dict=True) with seeded random weights."""
    import open_clip

    with seeded(seed):
        return open_clip.model.CLIP(**copy.deepcopy(TINY_OPEN_CLIP_CONFIG), output_dict=True)


def tiny_owlvit_config():
    """A tiny OWL-ViT detector config: 32x32 images in 8x8 patches (16 boxes), 16-token text queries."""
    from transformers import OwlViTConfig

    return OwlViTConfig(text_config=tiny_clip_text_config(max_positions=16, pad_token_id=0), vision_config=TINY_VISION,
                        projection_dim=32)


def tiny_owlvit(seed=0):
    from transformers import OwlViTForObjectDetection

    with seeded(seed):
        return OwlViTForObjectDetection(tiny_owlvit_config())
