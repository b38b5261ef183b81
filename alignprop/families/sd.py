"""Stable Diffusion 1.x and 2.x: a UNet2DConditionModel, one CLIP text encoder, DDIM; epsilon or v-prediction.

The prediction type is the checkpoint's scheduler config's (`prediction_type`: SD 1.x and 2-base predict
epsilon, SD 2.0/2.1 at 768 px predict v); `config.model.prediction_type` overrides it for checkpoints
whose config says otherwise. DDIM is built from the checkpoint's own scheduler config, never from
`DDIMScheduler()` defaults (linear betas, clip_sample=True: wrong for SD).
"""

import torch

from alignprop.families.base import Components, Family
from alignprop.families.loading import load_pipeline
from alignprop.rng import seeded
from alignprop.tokenizers import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, clip_tokenizer, tiny_clip_text_config, token_ids

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json, as DDIM. SD 2.x has the same betas.
SD15_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)
SD2_V_SCHEDULER_CONFIG = dict(SD15_SCHEDULER_CONFIG, prediction_type="v_prediction")

# The published architectures (REFERENCE_MODELS.md §1, §9), for full-size models with random weights.
SD15_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, cross_attention_dim=768, attention_head_dim=8,
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
)
SD2_UNET_CONFIG = dict(
    SD15_UNET_CONFIG, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
)
SD_VAE_CONFIG = dict(
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, sample_size=512,
)
SD15_TEXT_CONFIG = dict(
    vocab_size=CLIP_VOCAB_SIZE, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=CLIP_MAX_LENGTH, hidden_act="quick_gelu", projection_dim=768,
)
# OpenCLIP ViT-H/14's text tower, converted to 23 layers (the penultimate layer of the original).
SD2_TEXT_CONFIG = dict(
    SD15_TEXT_CONFIG, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
    hidden_act="gelu", projection_dim=512,
)
RANDOM = {
    # variant: (UNet, text encoder, scheduler, sample_size, SD 2.x tokenizer padding)
    "sd15": (SD15_UNET_CONFIG, SD15_TEXT_CONFIG, SD15_SCHEDULER_CONFIG, 64, False),
    "sd21": (SD2_UNET_CONFIG, SD2_TEXT_CONFIG, SD2_V_SCHEDULER_CONFIG, 96, True),
    "sd2-base": (SD2_UNET_CONFIG, SD2_TEXT_CONFIG, SD15_SCHEDULER_CONFIG, 64, True),
}

# Tiny models: a CPU run in seconds, with every kind of block the real UNet has (down/up, cross-attention, mid).
TINY_UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=tiny_clip_text_config()["hidden_size"], attention_head_dim=8, norm_num_groups=16,
)
# SD 2.x's differences: linear projections in the transformer blocks, per-block head counts, gelu text tower.
TINY_SD2_UNET_CONFIG = dict(TINY_UNET_CONFIG, attention_head_dim=(2, 4), use_linear_projection=True)
TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(16, 32),
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=32,
)
TINY = {
    # variant: (UNet, text activation, scheduler, SD 2.x tokenizer padding)
    "sd1": (TINY_UNET_CONFIG, "quick_gelu", SD15_SCHEDULER_CONFIG, False),
    "sd2": (TINY_SD2_UNET_CONFIG, "gelu", SD2_V_SCHEDULER_CONFIG, True),
    "sd2-base": (TINY_SD2_UNET_CONFIG, "gelu", SD15_SCHEDULER_CONFIG, True),
}


class StableDiffusion(Family):
    name = "sd"
    description = "Stable Diffusion 1.x/2.x"
    pipeline_class = "StableDiffusionPipeline"
    # Keys of the UNet in an original (LDM/A1111-style) single-file checkpoint.
    single_file_prefix = "model.diffusion_model."
    tiny_variants = {
        "sd1": "tiny SD 1.x-shaped models (epsilon)",
        "sd2": "tiny SD 2.x-shaped models, v-prediction (as SD 2.1 768)",
        "sd2-base": "tiny SD 2.x-shaped models, epsilon (as SD 2 base)",
    }
    random_variants = {
        "sd15": "Stable Diffusion 1.5's architecture, 512 px",
        "sd21": "Stable Diffusion 2.1's architecture, v-prediction, 768 px",
        "sd2-base": "Stable Diffusion 2 base's architecture, epsilon, 512 px",
    }

    def load(self, source, options=None, seed=0, device=None):
        components = super().load(source, options, seed, device)
        prediction_type = options.get("prediction_type") if options is not None else None
        if prediction_type:
            from diffusers import DDIMScheduler

            components.scheduler = DDIMScheduler.from_config(
                components.scheduler.config, prediction_type=prediction_type
            )
        return components

    def build_tiny(self, variant, seed):
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        unet_config, act, scheduler_config, sd2_padding = TINY[variant]
        with seeded(seed):
            unet = UNet2DConditionModel(**unet_config)
        with seeded(seed + 1):
            vae = AutoencoderKL(**TINY_VAE_CONFIG)
        with seeded(seed + 2):
            text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_clip_text_config(hidden_act=act)))
        tokenizer = clip_tokenizer(pad_token="!" if sd2_padding else None)
        return Components(unet, vae, DDIMScheduler(**scheduler_config), (text_encoder,), (tokenizer,))

    def build_random(self, variant, seed, device):
        """The published architecture with seeded random weights, built on `device` (seconds on a GPU)."""
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        unet_config, text_config, scheduler_config, size, sd2_padding = RANDOM[variant]
        with seeded(seed, device), torch.device(device or "cpu"):
            unet = UNet2DConditionModel(**dict(unet_config, sample_size=size))
            vae = AutoencoderKL(**dict(SD_VAE_CONFIG, sample_size=size * 8))
            text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
        tokenizer = clip_tokenizer(pad_token="!" if sd2_padding else None)
        return Components(unet, vae, DDIMScheduler(**scheduler_config), (text_encoder,), (tokenizer,))

    def load_pretrained(self, source, options=None):
        # Imported here: the pipeline module pulls in much of diffusers and transformers (seconds).
        from diffusers import DDIMScheduler

        pipe = load_pipeline(self, source, safety_checker=None, requires_safety_checker=False)
        scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        return Components(pipe.unet, pipe.vae, scheduler, (pipe.text_encoder,), (pipe.tokenizer,))

    def encode(self, components, prompts, size=None):
        """Prompts -> {"encoder_hidden_states": CLIP last hidden states [B, 77, D]}, as the pipeline encodes them."""
        (text_encoder,), (tokenizer,) = components.text_encoders, components.tokenizers
        ids = token_ids(tokenizer, prompts, text_encoder.device)
        with torch.no_grad():
            return {"encoder_hidden_states": text_encoder(ids, return_dict=False)[0]}

    def denoiser_call(self, denoiser, latents, timestep, cond):
        return denoiser(latents, timestep, **cond, return_dict=False)[0]

    def schedule(self, components, spec, device):
        from alignprop.sampling import DDIMSchedule

        return DDIMSchedule(components.scheduler.config, spec.num_steps, spec.eta, device)

    def pipeline(self, components):
        """diffusers' StableDiffusionPipeline of these components (its scheduler: the components' DDIM)."""
        from diffusers import StableDiffusionPipeline

        (text_encoder,), (tokenizer,) = components.text_encoders, components.tokenizers
        return StableDiffusionPipeline(
            vae=components.vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=components.denoiser,
            scheduler=components.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
