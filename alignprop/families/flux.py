"""FLUX.1 dev and schnell: the FluxTransformer2DModel on packed latents, CLIP-L pooled + T5-XXL, flow matching.

As `FluxPipeline` computes it (diffusers 0.42; REFERENCE_MODELS.md §4): the 16-channel latents are drawn
unpacked and packed into 2x2-patch tokens (B, h/2·w/2, 64) with image ids [0, row, col]; the prompt is CLIP-L's
pooled output and T5's `max_sequence_length` (512) tokens, with zero text ids. There is no classifier-free
guidance: dev takes the guidance scale as an input (`guidance`, distilled guidance; `config.sample.guidance_scale`,
3.5 in the pipeline), schnell none. The sigmas are linspace(1, 1/T, T) shifted by the checkpoint's scheduler:
dev's shift depends on the image's token count (`mu`, linear from 0.5 at 256 tokens to 1.15 at 4096), schnell's
is static (1.0).
"""

import numpy as np
import torch

from alignprop.families import flow
from alignprop.families.base import Family
from alignprop.families.loading import load_pipeline
from alignprop.rng import seeded
from alignprop.tokenizers import clip_tokenizer, t5_tokenizer, token_ids

# black-forest-labs/FLUX.1-{dev,schnell} scheduler/scheduler_config.json [M: REFERENCE_MODELS.md §4].
DEV_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                            max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
SCHNELL_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
VAE_FACTORS = dict(scaling_factor=0.3611, shift_factor=0.1159)
# FluxTransformer2DModel's class defaults are FLUX.1's architecture (REFERENCE_MODELS.md §9).
RANDOM = {"flux-dev": (dict(guidance_embeds=True), DEV_SCHEDULER_CONFIG),
          "flux-schnell": (dict(guidance_embeds=False), SCHNELL_SCHEDULER_CONFIG)}
# Tiny: one double-stream and one single-stream block over 16-channel latents packed to 64 (as the real one).
TINY_CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=flow.TINY_T5_CONFIG["d_model"], pooled_projection_dim=flow.TINY_CLIP_L_CONFIG["hidden_size"],
    axes_dims_rope=(4, 6, 6),
)
TINY = {"dev": (dict(TINY_CONFIG, guidance_embeds=True), DEV_SCHEDULER_CONFIG),
        "schnell": (dict(TINY_CONFIG, guidance_embeds=False), SCHNELL_SCHEDULER_CONFIG)}


def pack(latents):
    """(B, C, h, w) -> (B, h/2·w/2, 4C): each 2x2 patch one token, as FluxPipeline._pack_latents."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(latents, h, w):
    """(B, h/2·w/2, 4C) -> (B, C, h, w) for latent sizes h, w: the inverse of `pack`."""
    b, _, channels = latents.shape
    patches = latents.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels // 4, h, w)


def image_ids(h, w, device, dtype):
    """Rows [0, row, col] of the (h/2)·(w/2) tokens of latent size h, w (the transformer's 2-D RoPE positions)."""
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)


class Flux(flow.PromptCache, Family):
    name = "flux"
    description = "FLUX.1"
    pipeline_class = "FluxPipeline"
    denoiser_name = "transformer"
    # The attention projections of every attention block: both streams of the double blocks and the single
    # blocks' q/k/v (they have no output projection of their own). train_dreambooth_lora_flux adds the MLPs.
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    compile_blocks = ("FluxTransformerBlock", "FluxSingleTransformerBlock")
    size_multiple = 16  # VAE factor 8 x the 2x2 packing
    # BFL's single files hold only the transformer (ComfyUI's copies prefix it).
    single_file_prefix = ("double_blocks.", "model.diffusion_model.double_blocks.")
    default_max_sequence_length = 512  # the pipeline's (the docs advise <= 256 for schnell)
    default_sample_size = 128  # the pipeline's default latent size: 1024 px
    unbatched = ("txt_ids", "img_ids")
    tiny_variants = {"dev": "tiny FLUX.1-dev-shaped models (guidance embedding)",
                     "schnell": "tiny FLUX.1-schnell-shaped models"}
    random_variants = {"flux-dev": "FLUX.1-dev's architecture, 1024 px",
                       "flux-schnell": "FLUX.1-schnell's architecture, 1024 px"}

    # ---- loading ----
    def load(self, source, options=None, seed=0, device=None):
        components = super().load(source, options, seed, device)
        for key, value in flow.text_options(options, self.default_max_sequence_length).items():
            setattr(components, key, value)
        return components

    def build_tiny(self, variant, seed):
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        transformer_config, scheduler_config = TINY[variant]
        with seeded(seed):
            transformer = FluxTransformer2DModel(**transformer_config)
        with seeded(seed + 1):
            vae = AutoencoderKL(**flow.TINY_VAE16_CONFIG, **VAE_FACTORS)
        with seeded(seed + 2):
            clip = CLIPTextModel(CLIPTextConfig(**flow.TINY_CLIP_L_CONFIG))
        tokenizers = (clip_tokenizer(), t5_tokenizer())
        with seeded(seed + 3):
            t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizers[1]), **flow.TINY_T5_CONFIG))
        scheduler = FlowMatchEulerDiscreteScheduler(**scheduler_config)
        return flow.FlowComponents(transformer, vae, scheduler, (clip, t5), tokenizers)

    def build_random(self, variant, seed, device):
        """The published architecture with seeded random weights, initialized on `device` in bf16."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        transformer_config, scheduler_config = RANDOM[variant]
        with seeded(seed, device), flow.fast_init(device):
            transformer = FluxTransformer2DModel(**transformer_config)
            vae = AutoencoderKL(**flow.VAE16_CONFIG, **VAE_FACTORS)
            encoders = (CLIPTextModel(CLIPTextConfig(**flow.CLIP_L_CONFIG)),
                        T5EncoderModel(T5Config(**flow.T5_XXL_CONFIG)))
        scheduler = FlowMatchEulerDiscreteScheduler(**scheduler_config)
        return flow.FlowComponents(transformer, vae, scheduler, encoders, (clip_tokenizer(), t5_tokenizer()))

    def load_pretrained(self, source, options=None):
        pipe = load_pipeline(self, source)
        return flow.FlowComponents(pipe.transformer, pipe.vae, pipe.scheduler, (pipe.text_encoder, pipe.text_encoder_2),
                                   (pipe.tokenizer, pipe.tokenizer_2))

    def freeze_and_cast(self, components, device, dtype, vae_dtype=None):
        flow.freeze_and_cast(components, device, dtype, vae_dtype)

    def save_lora(self, directory, lora_state_dict, lora_config):
        super().save_lora(directory, flow.peft_keys(lora_state_dict), lora_config)

    # ---- shapes ----
    def image_size(self, components, height=None, width=None):
        native = self.default_sample_size * self.vae_scale_factor(components)
        return height or native, width or native

    def size_factor(self, components):
        return self.vae_scale_factor(components) * 2

    def latent_shape(self, components, height, width):
        """The unpacked latent shape (C, h, w); the rollout's latents are packed (`initial_latents`)."""
        factor = self.vae_scale_factor(components)
        return (components.denoiser.config.in_channels // 4, height // factor, width // factor)

    def initial_latents(self, components, batch, shape, generator, device, dtype=torch.float32):
        """x_T drawn unpacked (B, C, h, w) from `generator` and packed, as FluxPipeline.prepare_latents, in the
        denoiser's dtype (the pipeline's latents are the prompt's)."""
        latents = torch.randn((batch, *shape), generator=generator, device=generator.device, dtype=dtype)
        return pack(latents).to(device, dtype=components.denoiser.dtype)

    # ---- prompts, denoising, decoding ----
    def encode(self, components, prompts, size):
        """Prompts -> {"encoder_hidden_states" [B, max_sequence_length, 4096], "pooled_projections" [B, 768],
        "txt_ids" [max_sequence_length, 3], "img_ids" [h/2·w/2, 3]} (the ids 2-D, not batched, as
        FluxPipeline passes them), for an image of `size` (height, width) pixels."""
        cond = flow.encode_prompts(components, prompts, lambda batch: self._encode(components, batch))
        clip, pe = components.text_encoders[0], cond["encoder_hidden_states"]
        factor = self.vae_scale_factor(components)
        return dict(cond, txt_ids=torch.zeros(pe.shape[1], 3, device=pe.device, dtype=clip.dtype),
                    img_ids=image_ids(size[0] // factor, size[1] // factor, pe.device, pe.dtype))

    def _encode(self, components, prompts):
        (clip, t5), (clip_tokenizer_, t5_tokenizer_) = components.text_encoders, components.tokenizers
        pooled = clip(token_ids(clip_tokenizer_, prompts, clip.device), output_hidden_states=False).pooler_output
        ids = token_ids(t5_tokenizer_, prompts, t5.device, max_length=components.max_sequence_length)
        embeds = t5(ids, output_hidden_states=False)[0]
        return {"encoder_hidden_states": embeds.to(t5.dtype), "pooled_projections": pooled.to(clip.dtype)}

    def negative(self, components, size):
        return None  # no classifier-free guidance

    def guided_denoiser(self, components, call, cond, negative, spec):
        """One call per step; FLUX.1-dev gets `spec.guidance_scale` as its (fp32) guidance input every step."""
        if components.denoiser.config.guidance_embeds:
            batch, device = cond["encoder_hidden_states"].shape[0], cond["encoder_hidden_states"].device
            guidance = torch.full([1], spec.guidance_scale, device=device, dtype=torch.float32).expand(batch)
            cond = dict(cond, guidance=guidance)
        return lambda latents, timestep: call(latents, timestep, cond)

    def denoiser_call(self, denoiser, latents, timestep, cond):
        # As the pipeline: the timestep cast to the latents' dtype (bf16 rounds it), then / 1000.
        timestep = timestep.expand(latents.shape[0]).to(latents.dtype) / 1000
        return denoiser(hidden_states=latents, timestep=timestep, guidance=cond.get("guidance"),
                        pooled_projections=cond["pooled_projections"],
                        encoder_hidden_states=cond["encoder_hidden_states"], txt_ids=cond["txt_ids"],
                        img_ids=cond["img_ids"], joint_attention_kwargs={}, return_dict=False)[0]

    def schedule(self, components, spec, device):
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        from alignprop.sampling import FlowMatchSchedule

        config, n = components.scheduler.config, spec.num_steps
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / n, n)
        _, h, w = self.latent_shape(components, *self.image_size(components, spec.height, spec.width))
        mu = calculate_shift((h // 2) * (w // 2), config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        return FlowMatchSchedule(config, n, device, sigmas=sigmas, mu=mu)

    def vae_input(self, components, latents, size=None):
        factor = self.vae_scale_factor(components)
        return super().vae_input(components, unpack(latents, size[0] // factor, size[1] // factor))

    def pipeline(self, components):
        """diffusers' FluxPipeline of these components (offloaded text encoders moved beside the transformer)."""
        from diffusers import FluxPipeline

        (clip, t5), (clip_tokenizer_, t5_tokenizer_) = components.text_encoders, components.tokenizers
        if components.offload_text_encoders:
            for encoder in (clip, t5):
                encoder.to(flow.device_of(components.denoiser))
        return FluxPipeline(scheduler=components.scheduler, vae=components.vae, text_encoder=clip,
                            tokenizer=clip_tokenizer_, text_encoder_2=t5, tokenizer_2=t5_tokenizer_,
                            transformer=components.denoiser)

    def problems(self, config):
        out = flow.problems(config, self)
        if config.model.get("use_t5") is False:
            out.append("config.model.use_t5=False: FLUX.1 cannot drop T5 (its only token conditioning); "
                       "leave it True")
        if config.sample.guidance_rescale:
            out.append(f"config.sample.guidance_rescale={config.sample.guidance_rescale!r}: FLUX.1 has no "
                       f"classifier-free guidance to rescale; set it to 0")
        return out
