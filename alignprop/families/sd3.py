"""Stable Diffusion 3 and 3.5 (medium, large): the MMDiT transformer, CLIP-L + CLIP-G + T5-XXL, flow matching.

As `StableDiffusion3Pipeline` computes it (diffusers 0.42; REFERENCE_MODELS.md §3): both CLIPs' penultimate
hidden states side by side, zero-padded to T5's width and followed by T5's `max_sequence_length` tokens
(zeros without T5: `config.model.use_t5=False`, as diffusers' `text_encoder_3=None`); the pooled projection
is both CLIPs' projected pooled outputs. Classifier-free guidance is one batched call on ["" negative,
prompt], the negative encoded (never zeroed). The schedule is the checkpoint's FlowMatchEulerDiscreteScheduler
(static shift 3.0 for the published models; `mu` from the latent size if its config shifts dynamically).
"""

import torch

from alignprop.families import flow
from alignprop.families.base import Family
from alignprop.families.loading import load_pipeline
from alignprop.rng import seeded
from alignprop.tokenizers import clip_tokenizer, t5_tokenizer, token_ids

# stabilityai/stable-diffusion-3(.5)-* scheduler/scheduler_config.json [M: REFERENCE_MODELS.md §0, §3].
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0)
# The published transformers (REFERENCE_MODELS.md §9).
SD3M_CONFIG = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=192,
)
SD35M_CONFIG = dict(SD3M_CONFIG, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)), pos_embed_max_size=384)
SD35L_CONFIG = dict(SD3M_CONFIG, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                    qk_norm="rms_norm")
VAE_FACTORS = dict(scaling_factor=1.5305, shift_factor=0.0609)
RANDOM = {"sd35m": SD35M_CONFIG, "sd35l": SD35L_CONFIG, "sd3m": SD3M_CONFIG}

# Tiny: every kind of block the real one has (patch 2, 16 channels, a joint block and the context_pre_only
# last block; SD3.5's qk RMSNorm and a dual-attention block), widths of flow.TINY_* for the text.
TINY_SD3_CONFIG = dict(
    sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
    num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=flow.TINY_T5_CONFIG["d_model"],
    pooled_projection_dim=flow.TINY_CLIP_L_CONFIG["projection_dim"] + flow.TINY_CLIP_G_CONFIG["projection_dim"],
    pos_embed_max_size=32,
)
TINY = {"sd35": dict(TINY_SD3_CONFIG, qk_norm="rms_norm", dual_attention_layers=(0,)), "sd3": TINY_SD3_CONFIG}


class StableDiffusion3(flow.PromptCache, Family):
    name = "sd3"
    description = "Stable Diffusion 3/3.5"
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_name = "transformer"
    # The attention projections of every attention block: image and text streams of each joint block, and
    # SD3.5-medium's second (image-only) attention (`attn2`). Hits what diffusers' train_dreambooth_lora_sd3
    # targets ("attn.to_q", ...) plus attn2.
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    compile_blocks = ("JointTransformerBlock",)
    size_multiple = 16  # VAE factor 8 x patch 2
    single_file_prefix = "model.diffusion_model."
    default_max_sequence_length = 256  # the pipeline's
    tiny_variants = {
        "sd35": "tiny SD3.5-shaped models (qk RMSNorm, a dual-attention block)",
        "sd3": "tiny SD3-shaped models",
    }
    random_variants = {
        "sd35m": "Stable Diffusion 3.5 medium's architecture, 1024 px",
        "sd35l": "Stable Diffusion 3.5 large's architecture, 1024 px",
        "sd3m": "Stable Diffusion 3 medium's architecture, 1024 px",
    }

    # ---- loading ----
    def load(self, source, options=None, seed=0, device=None):
        t5 = flow.use_t5(options)
        if source.kind == "tiny":
            components = self.build_tiny(source.name, seed, t5)
        elif source.kind == "random":
            components = self.build_random(source.name, seed, device, t5)
        else:
            components = self.load_pretrained(source, options)
        for key, value in flow.text_options(options, self.default_max_sequence_length).items():
            setattr(components, key, value)
        return components

    def build_tiny(self, variant, seed, use_t5=True):
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

        with seeded(seed):
            transformer = SD3Transformer2DModel(**TINY[variant])
        with seeded(seed + 1):
            vae = AutoencoderKL(**flow.TINY_VAE16_CONFIG, **VAE_FACTORS)
        encoders = []
        for i, config in enumerate((flow.TINY_CLIP_L_CONFIG, flow.TINY_CLIP_G_CONFIG)):
            with seeded(seed + 2 + i):
                encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**config)))
        tokenizers = [clip_tokenizer(), clip_tokenizer(pad_token="!")]  # bigG's pads with "!", as open_clip's
        if use_t5:
            tokenizers.append(t5_tokenizer())
            with seeded(seed + 4):
                encoders.append(T5EncoderModel(T5Config(vocab_size=len(tokenizers[-1]), **flow.TINY_T5_CONFIG)))
        scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
        return flow.FlowComponents(transformer, vae, scheduler, tuple(encoders), tuple(tokenizers))

    def build_random(self, variant, seed, device, use_t5=True):
        """The published architecture with seeded random weights, initialized on `device` in bf16."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

        with seeded(seed, device), flow.fast_init(device):
            transformer = SD3Transformer2DModel(**RANDOM[variant])
            vae = AutoencoderKL(**flow.VAE16_CONFIG, **VAE_FACTORS)
            encoders = [CLIPTextModelWithProjection(CLIPTextConfig(**c)) for c in (flow.CLIP_L_CONFIG,
                                                                                   flow.CLIP_G_CONFIG)]
            if use_t5:
                encoders.append(T5EncoderModel(T5Config(**flow.T5_XXL_CONFIG)))
        tokenizers = [clip_tokenizer(), clip_tokenizer(pad_token="!")] + ([t5_tokenizer()] if use_t5 else [])
        scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
        return flow.FlowComponents(transformer, vae, scheduler, tuple(encoders), tuple(tokenizers))

    def load_pretrained(self, source, options=None):
        t5 = flow.use_t5(options)
        pipe = load_pipeline(self, source, **({} if t5 else {"text_encoder_3": None, "tokenizer_3": None}))
        encoders = (pipe.text_encoder, pipe.text_encoder_2) + ((pipe.text_encoder_3,) if t5 else ())
        tokenizers = (pipe.tokenizer, pipe.tokenizer_2) + ((pipe.tokenizer_3,) if t5 else ())
        return flow.FlowComponents(pipe.transformer, pipe.vae, pipe.scheduler, encoders, tokenizers)

    def freeze_and_cast(self, components, device, dtype, vae_dtype=None):
        flow.freeze_and_cast(components, device, dtype, vae_dtype)

    def save_lora(self, directory, lora_state_dict, lora_config):
        super().save_lora(directory, flow.peft_keys(lora_state_dict), lora_config)

    # ---- shapes ----
    def size_factor(self, components):
        return self.vae_scale_factor(components) * components.denoiser.config.patch_size

    def initial_latents(self, components, batch, shape, generator, device, dtype=torch.float32):
        """x_T ~ N(0, I) from `generator`, in the denoiser's dtype (the pipeline's latents are the prompt's)."""
        latents = super().initial_latents(components, batch, shape, generator, device, dtype)
        return latents.to(components.denoiser.dtype)

    # ---- prompts, denoising ----
    def encode(self, components, prompts, size=None):
        """Prompts -> {"encoder_hidden_states" [B, 77 + max_sequence_length, joint dim], "pooled_projections"
        [B, CLIP-L + CLIP-G projection dims]}, as `StableDiffusion3Pipeline.encode_prompt` encodes them."""
        return flow.encode_prompts(components, prompts, lambda batch: self._encode(components, batch))

    def _encode(self, components, prompts):
        clip_l, clip_g, *t5 = components.text_encoders
        hidden, pooled = [], []
        for encoder, tokenizer in zip((clip_l, clip_g), components.tokenizers):
            out = encoder(token_ids(tokenizer, prompts, encoder.device), output_hidden_states=True)
            pooled.append(out[0])  # text_embeds: the projected pooled output
            hidden.append(out.hidden_states[-2].to(clip_l.dtype))  # penultimate layer, in CLIP-L's dtype as diffusers
        if t5:
            (t5,), tokenizer = t5, components.tokenizers[2]
            ids = token_ids(tokenizer, prompts, t5.device, max_length=components.max_sequence_length)
            t5_embeds = t5(ids)[0].to(t5.dtype)
        else:  # diffusers' text_encoder_3=None: zeros in CLIP-L's dtype
            t5_embeds = torch.zeros(len(prompts), components.max_sequence_length,
                                    components.denoiser.config.joint_attention_dim, dtype=clip_l.dtype,
                                    device=clip_l.device)
        clip = torch.cat(hidden, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5_embeds.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5_embeds], dim=-2),
                "pooled_projections": torch.cat(pooled, dim=-1)}

    def denoiser_call(self, denoiser, latents, timestep, cond):
        # The timestep on the 0-1000 scale, not divided (SD3Transformer2DModel scales it itself).
        return denoiser(hidden_states=latents, timestep=timestep.expand(latents.shape[0]), **cond,
                        return_dict=False)[0]

    def schedule(self, components, spec, device):
        from alignprop.sampling import FlowMatchSchedule

        config, mu = components.scheduler.config, None
        if config.get("use_dynamic_shifting"):  # as the pipeline: mu from the number of image patches
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            height, width = self.image_size(components, spec.height, spec.width)
            patches = (height // self.size_factor(components)) * (width // self.size_factor(components))
            mu = calculate_shift(patches, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                 config.get("base_shift", 0.5), config.get("max_shift", 1.16))
        return FlowMatchSchedule(config, spec.num_steps, device, mu=mu)

    def pipeline(self, components):
        """diffusers' StableDiffusion3Pipeline of these components (offloaded text encoders moved beside the
        transformer: the pipeline encodes on its execution device)."""
        from diffusers import StableDiffusion3Pipeline

        encoders, tokenizers = components.text_encoders, components.tokenizers
        if components.offload_text_encoders:
            for encoder in encoders:
                encoder.to(flow.device_of(components.denoiser))
        third = (encoders[2], tokenizers[2]) if len(encoders) == 3 else (None, None)
        return StableDiffusion3Pipeline(
            transformer=components.denoiser, scheduler=components.scheduler, vae=components.vae,
            text_encoder=encoders[0], tokenizer=tokenizers[0], text_encoder_2=encoders[1], tokenizer_2=tokenizers[1],
            text_encoder_3=third[0], tokenizer_3=third[1],
        )

    def problems(self, config):
        return flow.problems(config, self)
