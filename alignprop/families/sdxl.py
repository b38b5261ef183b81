"""Stable Diffusion XL (Podell et al. 2023): one UNet with micro-conditioning, two CLIP text encoders, DDIM.

What differs from SD 1.x/2.x (`sd.py`, whose DDIM, UNet call and prediction-type override this reuses):
- prompts go through both text encoders (CLIP ViT-L and OpenCLIP bigG); the UNet's cross-attention takes
  their penultimate hidden states concatenated (768 + 1280 features), its added conditioning takes bigG's
  pooled, projected embedding and the micro-conditioning `time_ids` (original size, crop top-left, target
  size; paper Sec. 2.2), here (H, W), (0, 0), (H, W) as diffusers' pipeline builds them by default;
- the unconditional branch of guidance is all zeros (embeddings and pooled embedding) for checkpoints with
  `force_zeros_for_empty_prompt` (the base model), as the pipeline builds it for no negative prompt;
- the checkpoint's scheduler (Euler for the base model) is replaced by DDIM from its config (same betas,
  steps_offset and spacing; DDIM's `init_noise_sigma` is 1);
- the VAE overflows in fp16 (`force_upcast`): it is kept in fp32 under fp16 as the pipeline does, unless
  `config.model.vae` names an fp16-safe one or `config.model.vae_dtype` says otherwise.
"""

import torch

from alignprop.families.base import Components
from alignprop.families.loading import ModelLoadError, load_pipeline
from alignprop.families.sd import SD15_SCHEDULER_CONFIG, SD15_TEXT_CONFIG, SD_VAE_CONFIG, TINY_VAE_CONFIG
from alignprop.families.sd import StableDiffusion
from alignprop.rng import seeded
from alignprop.tokenizers import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, clip_tokenizer, tiny_clip_text_config, token_ids

# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json: Euler, which keeps the DDIM/PNDM
# fields (clip_sample, set_alpha_to_one) in its config, so that DDIM built from it has the right ones.
SDXL_SCHEDULER_CONFIG = dict(
    SD15_SCHEDULER_CONFIG, timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False,
    sample_max_value=1.0, skip_prk_steps=True, trained_betas=None,
)
# DDIM's defaults for fields a checkpoint's (non-DDIM) scheduler config may lack: clip_sample=True would clip
# the predicted x0 to [-1, 1], wrong for latents (and it cuts the gradient); SD's final alpha is not 1.
DDIM_FIELDS_IF_MISSING = {"clip_sample": False, "set_alpha_to_one": False}
# The published architectures (REFERENCE_MODELS.md §9), for full-size models with random weights.
SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + bigG's 1280
)
SDXL_VAE_CONFIG = dict(SD_VAE_CONFIG, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
CLIP_L_TEXT_CONFIG = SD15_TEXT_CONFIG
CLIP_BIGG_TEXT_CONFIG = dict(
    vocab_size=CLIP_VOCAB_SIZE, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
    num_attention_heads=20, max_position_embeddings=CLIP_MAX_LENGTH, hidden_act="gelu", projection_dim=1280,
)

# Tiny models: both text encoders of different widths (and a projection of yet another width), so that a
# swapped concatenation, a wrong pooled vector or a hidden state in place of a projection fails loudly.
TINY_TEXT_L = tiny_clip_text_config()  # hidden 32, quick_gelu
TINY_TEXT_G = dict(tiny_clip_text_config(hidden_act="gelu"), hidden_size=40, num_hidden_layers=3, projection_dim=24)
TINY_TIME_EMBED_DIM = 8
TINY_UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), norm_num_groups=16, use_linear_projection=True,
    cross_attention_dim=TINY_TEXT_L["hidden_size"] + TINY_TEXT_G["hidden_size"],
    addition_embed_type="text_time", addition_time_embed_dim=TINY_TIME_EMBED_DIM,
    projection_class_embeddings_input_dim=6 * TINY_TIME_EMBED_DIM + TINY_TEXT_G["projection_dim"],
)
TINY_SDXL_VAE_CONFIG = dict(TINY_VAE_CONFIG, scaling_factor=0.13025, force_upcast=True)


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    description = "Stable Diffusion XL"
    pipeline_class = "StableDiffusionXLPipeline"
    # An original (SGM-format) single file: the UNet's keys, and those of the second text encoder (bigG),
    # which an SD 1.x/2.x file lacks.
    single_file_prefix = "model.diffusion_model."
    single_file_keys = (("conditioner.embedders.1.model.", "SDXL's second text encoder (OpenCLIP bigG)"),)
    tiny_variants = {"sdxl": "tiny SDXL-shaped models (two text encoders, micro-conditioning)"}
    random_variants = {"sdxl": "SDXL base 1.0's architecture, 1024 px"}

    def build_tiny(self, variant, seed):
        from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        with seeded(seed):
            unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
        with seeded(seed + 1):
            vae = AutoencoderKL(**TINY_SDXL_VAE_CONFIG)
        with seeded(seed + 2):
            text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_L))
        with seeded(seed + 3):
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_TEXT_G))
        # The checkpoint's scheduler is Euler, as the hub's: the sampling DDIM is built from its config.
        return self._components(unet, vae, EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG), text_encoder,
                                text_encoder_2, {"force_zeros_for_empty_prompt": True})

    def build_random(self, variant, seed, device):
        """SDXL base's architecture with seeded random weights, built on `device` (seconds on a GPU)."""
        from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        with seeded(seed, device), torch.device(device or "cpu"):
            unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
            vae = AutoencoderKL(**SDXL_VAE_CONFIG)
            text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT_CONFIG))
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG_TEXT_CONFIG))
        return self._components(unet, vae, EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG), text_encoder,
                                text_encoder_2, {"force_zeros_for_empty_prompt": True})

    def load_pretrained(self, source, options=None):
        # No watermarker: it is numpy (no gradient) and alters the images the reward would see.
        pipe = load_pipeline(self, source, add_watermarker=False)
        if pipe.text_encoder is None or pipe.tokenizer is None:
            raise ModelLoadError(
                f"config.model.source={source.name!r} has no first text encoder (an SDXL refiner?): the sdxl "
                f"family needs a base model with both text encoders (text_encoder and text_encoder_2)."
            )
        components = self._components(pipe.unet, pipe.vae, pipe.scheduler, pipe.text_encoder, pipe.text_encoder_2,
                                      {"force_zeros_for_empty_prompt": pipe.config.force_zeros_for_empty_prompt},
                                      (pipe.tokenizer, pipe.tokenizer_2))
        self._check_added_conditioning(components, source.name)
        return components

    def _components(self, unet, vae, scheduler, text_encoder, text_encoder_2, pipeline_config, tokenizers=None):
        from diffusers import DDIMScheduler

        # The bigG tokenizer pads with "!" (id 0), as open_clip does; CLIP-L's pads with its end token.
        tokenizers = tokenizers or (clip_tokenizer(), clip_tokenizer(pad_token="!"))
        scheduler = DDIMScheduler.from_config({**DDIM_FIELDS_IF_MISSING, **scheduler.config})
        return Components(unet, vae, scheduler, (text_encoder, text_encoder_2), tokenizers, pipeline_config)

    def _check_added_conditioning(self, components, name):
        """The pipeline's check: 6 time ids x the UNet's time embedding + bigG's projection = the added input."""
        unet, text_encoder_2 = components.denoiser, components.text_encoders[1]
        given = unet.config.addition_time_embed_dim * 6 + text_encoder_2.config.projection_dim
        expected = unet.add_embedding.linear_1.in_features
        if given != expected:
            raise ModelLoadError(
                f"config.model.source={name!r}: the UNet expects added conditioning of {expected} features but "
                f"6 time ids x {unet.config.addition_time_embed_dim} + the text encoder's projection "
                f"{text_encoder_2.config.projection_dim} give {given}; it is not an SDXL base checkpoint."
            )

    def vae_dtype(self, components, dtype):
        """fp32 under fp16 for a VAE with `force_upcast` (the SDXL VAE overflows in fp16), as the pipeline
        decodes; otherwise the inference dtype (bf16 is never upcast)."""
        if dtype == torch.float16 and getattr(components.vae.config, "force_upcast", False):
            return torch.float32
        return dtype

    # ---- prompts ----
    def encode(self, components, prompts, size):
        """Prompts -> {"encoder_hidden_states": [B, 77, D_L + D_G], "added_cond_kwargs": {"text_embeds":
        bigG's pooled projection [B, P], "time_ids": [B, 6]}}, as `StableDiffusionXLPipeline.encode_prompt`."""
        hidden = []
        with torch.no_grad():
            for tokenizer, text_encoder in zip(components.tokenizers, components.text_encoders):
                out = text_encoder(token_ids(tokenizer, prompts, text_encoder.device), output_hidden_states=True)
                hidden.append(out.hidden_states[-2])  # penultimate layer, before the final layer norm
            pooled = out.text_embeds  # the second (projection) encoder's
        # The pipeline casts the embeddings to the second encoder's dtype; the time ids take theirs.
        embeds = torch.cat(hidden, dim=-1).to(components.text_encoders[1].dtype)
        return {"encoder_hidden_states": embeds,
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": self.time_ids(size, embeds)}}

    def time_ids(self, size, like):
        """SDXL's micro-conditioning [B, 6]: original size (H, W), crop top-left (0, 0), target size (H, W)."""
        height, width = size
        ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=like.dtype, device=like.device)
        return ids.expand(len(like), 6)

    def negative(self, components, size):
        """The unconditional conditioning: zeros for `force_zeros_for_empty_prompt` checkpoints (the pipeline's
        `negative_prompt=None`), otherwise the encoded empty prompt; the time ids are the prompts' own."""
        cond = self.encode(components, [""], size)
        if components.pipeline_config.get("force_zeros_for_empty_prompt", True):
            added = cond["added_cond_kwargs"]
            cond = {"encoder_hidden_states": torch.zeros_like(cond["encoder_hidden_states"]),
                    "added_cond_kwargs": dict(added, text_embeds=torch.zeros_like(added["text_embeds"]))}
        return cond

    def vae_input(self, components, latents, size=None):
        """Latents -> VAE decoder input, as the pipeline: denormalized by the VAE's latents mean/std if it
        has them, otherwise unscaled."""
        config = components.vae.config
        if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
            mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            return (latents * std / config.scaling_factor + mean).to(components.vae.dtype)
        return super().vae_input(components, latents, size)

    def pipeline(self, components):
        """diffusers' StableDiffusionXLPipeline of these components (the components' DDIM, no watermarker)."""
        from diffusers import StableDiffusionXLPipeline

        (text_encoder, text_encoder_2), (tokenizer, tokenizer_2) = components.text_encoders, components.tokenizers
        _decode_in_own_dtype(components.vae)
        return StableDiffusionXLPipeline(
            vae=components.vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=components.denoiser,
            scheduler=components.scheduler,
            force_zeros_for_empty_prompt=components.pipeline_config.get("force_zeros_for_empty_prompt", True),
            add_watermarker=False,
        )


def _decode_in_own_dtype(vae):
    """Make the VAE cast what it decodes to its own dtype. The pipeline hands it latents in the UNet's dtype
    and upcasts only an fp16 VAE itself, so a VAE kept in fp32 beside a half-precision UNet would fail."""
    first = vae.post_quant_conv if vae.post_quant_conv is not None else vae.decoder
    if not getattr(first, "_alignprop_casts_input", False):
        first.register_forward_pre_hook(lambda module, args: tuple(a.to(vae.dtype) for a in args))
        first._alignprop_casts_input = True
