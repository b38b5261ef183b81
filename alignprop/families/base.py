"""What every model family provides, and what they share: components, model sources, guidance, decoding.

A family answers, for one kind of checkpoint: how to load it (or build it tiny or full-size with random
weights), how to encode prompts into the conditioning its denoiser takes, how to call the denoiser with
guidance, which schedule steps it, the latent shape of an image size, how latents become VAE input,
which modules get LoRA and in which pipeline format the LoRA is saved. Nothing above a family knows a
family's details; nothing in a family knows about accelerators, rewards or configs beyond `config.model`.
"""

import dataclasses
import os

import torch

from alignprop.errors import ConfigError


@dataclasses.dataclass
class Components:
    """The loaded models of one checkpoint; `text_encoders[i]` goes with `tokenizers[i]`."""

    denoiser: torch.nn.Module  # UNet2DConditionModel, or a diffusion transformer
    vae: torch.nn.Module
    scheduler: object  # the checkpoint's scheduler (a family builds its sampling schedule from its config)
    text_encoders: tuple
    tokenizers: tuple
    # Pipeline-level settings of the checkpoint that the family reads (model_index.json's extra fields, e.g.
    # SDXL's force_zeros_for_empty_prompt).
    pipeline_config: dict = dataclasses.field(default_factory=dict)

    def modules(self):
        return (self.denoiser, self.vae, *self.text_encoders)


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a family's weights come from: `config.model.source` parsed once."""

    kind: str  # "hub", "folder", "file", "tiny" (tiny random models) or "random" (full-size, random weights)
    name: str  # hub id, path, or the tiny / random variant
    revision: str = None

    @property
    def random(self):
        return self.kind in ("tiny", "random")


SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def parse_source(text, revision, family, key="config.model.source"):
    """`config.model.source` -> Source; a ConfigError naming the key and the valid forms if it names nothing."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{key}={text!r}: give a hub id, a local folder, a single file, tiny or random:<size>.")
    kind, _, variant = text.partition(":")
    for prefix, variants in (("tiny", family.tiny_variants), ("random", family.random_variants)):
        if kind == prefix:
            variant = variant or next(iter(variants))
            if variant not in variants:
                valid = ", ".join(f"{prefix}:{v}" for v in variants)
                raise ConfigError(f"{key}={text!r}: the {family.name} family has no {prefix} size {variant!r}; "
                                  f"valid: {valid}.")
            return Source(prefix, variant)
    path = os.path.expanduser(text)
    if path.endswith(SINGLE_FILE_SUFFIXES):
        if not os.path.isfile(path):
            raise ConfigError(f"{key}={text!r}: no such checkpoint file.")
        return Source("file", path)
    if text.startswith(("/", ".", "~")) or text.count("/") > 1 or os.path.isdir(path):
        if not os.path.isdir(path):
            raise ConfigError(f"{key}={text!r}: no such folder (a hub id looks like 'org/name').")
        return Source("folder", path, revision)
    return Source("hub", text, revision)


class Family:
    """The interface every family implements (see the module docstring); shared behaviour lives here."""

    name = ""
    description = ""
    pipeline_class = ""  # the diffusers pipeline of this family (LoRA format, generation, tests)
    denoiser_name = "unet"  # the pipeline's name for the denoiser: also the LoRA keys' prefix
    # The paper's LoRA targets: the attention projections of every attention block (overridable).
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    # The repeated blocks of the denoiser and of the VAE decoder: what `config.speed.compile_scope="blocks"`
    # compiles (regional compilation: each block class is traced once per shape and its graph reused by every
    # block of that shape, instead of tracing the whole network as one graph).
    compile_blocks = ("BasicTransformerBlock", "ResnetBlock2D")
    vae_compile_blocks = ("ResnetBlock2D",)
    # Image sizes must be multiples of this (the VAE's factor of every published checkpoint of the family;
    # checked again against the loaded VAE).
    size_multiple = 8
    # Conditioning entries that are not batched (one for every sample, e.g. FLUX's position ids).
    unbatched = ()
    # Sources that build models instead of loading them: name -> what it is (the first is the default).
    tiny_variants = {}
    random_variants = {}
    # An original (non-diffusers) single-file checkpoint: the prefix of its denoiser's keys, and (prefix, what
    # it is) of other keys it must have, which tell this family's files from another family's.
    single_file_prefix = ""
    single_file_keys = ()

    # ---- loading ----
    def load(self, source, options=None, seed=0, device=None):
        """Components from a parsed Source; `options`: `config.model`. Tiny and random models are built with
        seeded weights (random ones on `device`); the others are loaded on the CPU."""
        if source.kind == "tiny":
            components = self.build_tiny(source.name, seed)
        elif source.kind == "random":
            components = self.build_random(source.name, seed, device)
        else:
            components = self.load_pretrained(source, options)
        vae = options.get("vae") if options is not None else None
        if vae:  # another VAE in place of the checkpoint's (e.g. an fp16-safe one)
            from alignprop.families.loading import load_vae

            components.vae = load_vae(vae, components)
        return components

    def build_tiny(self, variant, seed):
        raise NotImplementedError

    def build_random(self, variant, seed, device):
        raise NotImplementedError

    def load_pretrained(self, source, options=None):
        raise NotImplementedError

    def freeze_and_cast(self, components, device, dtype, vae_dtype=None):
        """Freeze every weight, eval mode, move to `device` in the inference dtype (the VAE in `vae_dtype`,
        default `vae_dtype(components, dtype)`)."""
        vae_dtype = vae_dtype or self.vae_dtype(components, dtype)
        for module in components.modules():
            module.requires_grad_(False)
            module.eval()
            module.to(device, dtype=vae_dtype if module is components.vae else dtype)

    def vae_dtype(self, components, dtype):
        """The VAE's dtype for inference dtype `dtype` when `config.model.vae_dtype` is "auto": the pipeline's."""
        return dtype

    # ---- shapes ----
    def vae_scale_factor(self, components):
        return 2 ** (len(components.vae.config.block_out_channels) - 1)

    def image_size(self, components, height=None, width=None):
        """(height, width) in pixels: the given ones, or the denoiser's native size."""
        native = components.denoiser.config.sample_size * self.vae_scale_factor(components)
        return height or native, width or native

    def check_size(self, components, height, width):
        """Image sizes must be multiples of the loaded VAE's downsampling factor (and of any patch size)."""
        factor = self.size_factor(components)
        for key, value in (("sample.height", height), ("sample.width", width)):
            if value % factor:
                lower = max(factor, value // factor * factor)
                raise ConfigError(f"config.{key}={value} is not a multiple of this model's size factor {factor} "
                                  f"(VAE downsampling x patch size); use e.g. {lower} or {lower + factor}.")

    def size_factor(self, components):
        return self.vae_scale_factor(components)

    def latent_shape(self, components, height, width):
        factor = self.vae_scale_factor(components)
        return (components.denoiser.config.in_channels, height // factor, width // factor)

    def initial_latents(self, components, batch, shape, generator, device, dtype=torch.float32):
        """x_T ~ N(0, I), drawn from an explicit generator (its device decides where it is drawn)."""
        latents = torch.randn((batch, *shape), generator=generator, device=generator.device, dtype=dtype)
        return latents.to(device) * getattr(components.scheduler, "init_noise_sigma", 1.0)

    # ---- prompts, denoising, decoding ----
    def encode(self, components, prompts, size):
        """Prompt strings -> the conditioning dict the denoiser call takes (batch first; no gradients). `size`:
        the image's (height, width) in pixels, for families whose conditioning depends on it (SDXL's time ids)."""
        raise NotImplementedError

    def precompute_prompts(self, components, prompts, max_gib):
        """Encode `prompts` into the components' prompt cache now, where the family keeps one (SD3, FLUX: see
        flow.precompute_prompts); returns (prompts encoded, GiB of CPU memory, or None where skipped)."""
        return 0, 0.0

    def negative(self, components, size):
        """The unconditional conditioning of classifier-free guidance, batch 1 (None: no CFG in this family)."""
        return self.encode(components, [""], size)

    def denoiser_call(self, denoiser, latents, timestep, cond):
        """One call of the denoiser on a batch: its raw prediction."""
        raise NotImplementedError

    def guided_denoiser(self, components, call, cond, negative, spec):
        """(latents, timestep) -> the guided prediction of `call(latents, timestep, cond)`: classifier-free
        guidance with `spec`'s scale and rescale (a family with distilled guidance overrides this)."""
        return guided_denoiser(call, cond, negative, spec.guidance_scale, spec.guidance_rescale)

    def schedule(self, components, spec, device):
        raise NotImplementedError

    def vae_input(self, components, latents, size=None):
        """Latents -> what the VAE decoder takes: unscaled (and shifted) by the VAE's own config values. `size`:
        (height, width) in pixels, for families whose latents are packed."""
        vae = components.vae
        latents = latents / vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None)
        if shift:
            latents = latents + shift
        return latents.to(vae.dtype)

    # ---- LoRA in the pipeline's format ----
    def save_lora(self, directory, lora_state_dict, lora_config):
        """Write `pytorch_lora_weights.safetensors` as this family's pipeline writes it (loadable with
        `pipe.load_lora_weights(directory)`); the adapter metadata keeps alpha != rank loading at the right scale."""
        self.pipeline_cls().save_lora_weights(
            directory,
            safe_serialization=True,
            **{f"{self.denoiser_name}_lora_layers": lora_state_dict,
               f"{self.denoiser_name}_lora_adapter_metadata": lora_config.to_dict()},
        )

    def pipeline_cls(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    def pipeline(self, components):
        """A diffusers pipeline of these components (generation, and the references of the tests)."""
        raise NotImplementedError

    def problems(self, config):
        """Start-up checks of the config keys only this family reads or forbids (each `config.<key>=<value>: ...`)."""
        return []


def concat_cond(a, b):
    """Batch-concatenate two conditioning dicts (nested dicts too), e.g. [uncond, cond] for guidance."""
    return {k: concat_cond(a[k], b[k]) if isinstance(a[k], dict) else torch.cat([a[k], b[k]]) for k in a}


def expand_cond(cond, batch):
    """A batch-1 conditioning dict repeated to `batch` rows (views, no copies)."""
    return {k: expand_cond(v, batch) if isinstance(v, dict) else v.expand(batch, *v.shape[1:]) for k, v in cond.items()}


def rescale_guidance(guided, cond_pred, rescale):
    """Guidance rescale (Lin et al. 2023, arXiv 2305.08891, Sec. 3.4): match the std of the conditional
    prediction, mixed back in by `rescale` (0: plain CFG; ~0.7 for v-prediction models)."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond_pred.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return rescale * rescaled + (1 - rescale) * guided


def guided_denoiser(call, cond, negative, guidance_scale, guidance_rescale=0.0):
    """(latents, timestep) -> prediction with classifier-free guidance (Ho & Salimans 2022).

    `call(latents, timestep, cond)` is one denoiser call. Conditional and unconditional predictions come
    from one batched call on [uncond, cond], as diffusers' pipelines do; guidance_scale <= 1 (or no
    negative conditioning) runs the conditional branch alone.
    """
    do_cfg = guidance_scale > 1.0 and negative is not None
    both = concat_cond(negative, cond) if do_cfg else cond

    def denoise(latents, timestep):
        if not do_cfg:
            return call(latents, timestep, cond)
        uncond_pred, cond_pred = call(torch.cat([latents, latents]), timestep, both).chunk(2)
        guided = uncond_pred + guidance_scale * (cond_pred - uncond_pred)
        return rescale_guidance(guided, cond_pred, guidance_rescale) if guidance_rescale > 0 else guided

    return denoise
