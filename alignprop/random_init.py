"""Full-size architectures with random weights, built from configs written here (nothing downloaded).

Same compute and memory as the real models: for the benchmark and for multi-GPU runs on machines without
the weights (`config.random_weights=True`). The configs are those of the published checkpoints:
runwayml/stable-diffusion-v1-5 (UNet, VAE, CLIP text encoder) and openai/clip-vit-large-patch14 (the
aesthetic reward's vision tower); open_clip ships its architectures (ViT-H-14 for HPS) in its package.
"""

import torch

from alignprop.rng import seeded

SD15_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, cross_attention_dim=768, attention_head_dim=8,
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
)
SD15_VAE_CONFIG = dict(
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, sample_size=512,
)
SD15_TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)
CLIP_VIT_L14_VISION_CONFIG = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
    patch_size=14, projection_dim=768, hidden_act="quick_gelu",
)


def build_sd15_components(seed=0, device=None):
    """Stable Diffusion 1.5's UNet, VAE and text encoder with seeded random weights, the offline CLIP
    tokenizer and SD's DDIM scheduler. Built on `device` (random init on a GPU takes seconds)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from alignprop.tiny import SD15_SCHEDULER_CONFIG, clip_tokenizer

    with seeded(seed, device), torch.device(device or "cpu"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        vae = AutoencoderKL(**SD15_VAE_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG))
    return dict(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
        scheduler=DDIMScheduler(**SD15_SCHEDULER_CONFIG),
    )


def build_vit_l14_vision(seed=0, device=None):
    """CLIP ViT-L/14's vision tower with its projection (the aesthetic reward's), seeded random weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with seeded(seed, device), torch.device(device or "cpu"):
        return CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VIT_L14_VISION_CONFIG))
