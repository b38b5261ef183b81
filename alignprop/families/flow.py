"""What the flow-matching families (SD3/3.5 and FLUX.1) share: their text towers and VAE (published and tiny
configs), the text-encoder memory knobs of `config.model`, fast builds of full-size random weights, and the
start-up checks of the keys that make no sense for a flow-matching model.

Memory (issue #17, item 4): T5-XXL alone is 8.9 GiB in bf16. The text encoders run once per prompt batch
under no_grad; `offload_text_encoders` keeps them in CPU memory and moves them to the accelerator only to
encode (and back), and `cache_prompt_embeddings` keeps each prompt's embeddings in CPU memory after its
first encoding, so the encoders stop running once the prompt set has been seen; with the cache, training
encodes the whole prompt set at start-up (`precompute_prompts`), so that no step moves or runs them.
"""

import contextlib
import dataclasses

import torch

from alignprop.families.base import Components
from alignprop.families.sd import SD15_TEXT_CONFIG
from alignprop.tokenizers import tiny_clip_text_config

# The most T5 tokens the SD3 and FLUX pipelines accept (`check_inputs`).
MAX_SEQUENCE_LENGTH = 512

# Published text towers (REFERENCE_MODELS.md §9): CLIP ViT-L/14, OpenCLIP bigG/14 (both with the projection
# in SD3; FLUX uses CLIP-L's pooled output without it) and T5 v1.1 XXL's encoder.
CLIP_L_CONFIG = SD15_TEXT_CONFIG  # the same CLIP ViT-L/14 text tower as SD 1.x's (and SDXL's first)
CLIP_G_CONFIG = dict(
    CLIP_L_CONFIG, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    hidden_act="gelu", projection_dim=1280,
)
T5_XXL_CONFIG = dict(
    vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
    feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
    layer_norm_epsilon=1e-6,
)
# The 16-channel VAE of SD3 and FLUX: SD's layout, no quant convs; scaling and shift come with each family.
VAE16_CONFIG = dict(
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, layers_per_block=2, sample_size=1024,
    use_quant_conv=False, use_post_quant_conv=False,
)

# Tiny towers: CLIP-L 32 wide, CLIP-G 48 wide, T5 96 wide, so that SD3's CLIP features (32 + 48) are zero-padded
# to T5's width as in the real model (768 + 1280 -> 4096), and every width is distinct.
TINY_CLIP_L_CONFIG = dict(tiny_clip_text_config(), projection_dim=32)
TINY_CLIP_G_CONFIG = dict(tiny_clip_text_config(hidden_act="gelu"), hidden_size=48, projection_dim=48)
TINY_T5_CONFIG = dict(
    d_model=96, d_ff=64, d_kv=16, num_heads=4, num_layers=2, feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=8, relative_attention_max_distance=32,
)
TINY_VAE16_CONFIG = dict(
    block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=16, layers_per_block=1, norm_num_groups=8,
    sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
)


@dataclasses.dataclass
class FlowComponents(Components):
    """Components plus how prompts are encoded (`config.model`'s text keys, set by the family's `load`)."""

    max_sequence_length: int = 256  # T5 tokens (padded to it, as the pipelines pad)
    offload_text_encoders: bool = False
    cache_prompt_embeddings: bool = False
    prompt_cache: dict = dataclasses.field(default_factory=dict, repr=False)  # prompt -> {name: CPU tensor [1, ...]}


def text_options(options, default_max_sequence_length):
    """The text keys of `config.model` (None: defaults) as FlowComponents fields."""
    get = (lambda key, default: default) if options is None else (
        lambda key, default: default if options.get(key) is None else options.get(key))
    return dict(
        max_sequence_length=get("max_sequence_length", default_max_sequence_length),
        offload_text_encoders=bool(get("offload_text_encoders", False)),
        cache_prompt_embeddings=bool(get("cache_prompt_embeddings", False)),
    )


def use_t5(options):
    return True if options is None or options.get("use_t5") is None else bool(options.get("use_t5"))


def device_of(module):
    return next(module.parameters()).device


def freeze_and_cast(components, device, dtype, vae_dtype=None):
    """Freeze, eval and cast every module (the VAE in `vae_dtype`, default `dtype`); the text encoders stay
    in CPU memory when they are offloaded."""
    for module in components.modules():
        module.requires_grad_(False)
        module.eval()
        offloaded = components.offload_text_encoders and module in components.text_encoders
        cast = (vae_dtype or dtype) if module is components.vae else dtype
        module.to("cpu" if offloaded else device, dtype=cast)


@contextlib.contextmanager
def text_encoders_on(components, device):
    """The text encoders on `device` inside the block (offloaded ones moved there, then back to the CPU)."""
    if not components.offload_text_encoders:
        yield
        return
    for encoder in components.text_encoders:
        encoder.to(device)
    try:
        yield
    finally:
        for encoder in components.text_encoders:
            encoder.to("cpu")


def encode_prompts(components, prompts, encode_batch):
    """`encode_batch(prompts)` -> {name: [B, ...] tensor}, on the denoiser's device, without gradients.

    With `cache_prompt_embeddings` each prompt is encoded once, alone (its embedding then does not depend on
    the batch it first came in), and kept in CPU memory; later batches are assembled from the cache.
    """
    device = device_of(components.denoiser)
    if not components.cache_prompt_embeddings:
        with text_encoders_on(components, device), torch.no_grad():
            return encode_batch(list(prompts))
    cache = components.prompt_cache
    fill_prompt_cache(components, prompts, encode_batch)
    names = cache[prompts[0]].keys()
    return {k: torch.cat([cache[p][k] for p in prompts]).to(device, non_blocking=True) for k in names}


def fill_prompt_cache(components, prompts, encode_batch, max_gib=None):
    """Encode the prompts not yet in the cache, each alone, in one visit of the text encoders. With `max_gib`: stop
    after the first one if the embeddings of all `prompts` would take more GiB of CPU memory than that. Returns
    (prompts encoded, GiB of all `prompts`' embeddings, None where stopped)."""
    cache, unique = components.prompt_cache, list(dict.fromkeys(prompts))
    missing = [p for p in unique if p not in cache]
    if not missing:
        return 0, 0.0
    with text_encoders_on(components, device_of(components.denoiser)), torch.no_grad():
        for i, prompt in enumerate(missing):
            cache[prompt] = {k: v.cpu() for k, v in encode_batch([prompt]).items()}
            if i == 0:
                gib = sum(v.numel() * v.element_size() for v in cache[prompt].values()) * len(unique) / 2**30
                if max_gib is not None and gib > max_gib:
                    return 1, None
    return len(missing), gib


def precompute_prompts(components, prompts, encode_batch, max_gib):
    """Fill the prompt cache with every prompt of `prompts` at start-up, in one visit of the text encoders, unless
    the embeddings would take more than `max_gib` GiB of CPU memory (judged from the first prompt's). Returns
    (prompts encoded, GiB or None when skipped); a no-op without `cache_prompt_embeddings`."""
    if not components.cache_prompt_embeddings:
        return 0, 0.0
    count, gib = fill_prompt_cache(components, prompts, encode_batch, max_gib)
    return (0, None) if gib is None else (count, gib)


class PromptCache:
    """The prompt cache of the flow families (mixed in before Family): their `_encode(components, prompts)`."""

    def precompute_prompts(self, components, prompts, max_gib):
        return precompute_prompts(components, prompts, lambda batch: self._encode(components, batch), max_gib)


def peft_keys(lora_state_dict):
    """The LoRA state dict with peft's `lora_A`/`lora_B` keys, as diffusers' SD3/FLUX LoRA scripts save it.

    diffusers' PEFT -> diffusers conversion renames only to_q/k/v/out's factors (`lora.down`/`up`), not
    add_*_proj's or to_add_out's; the SD3/FLUX loaders see `lora_A` keys, skip their own conversion and drop
    the renamed factors, so the mixed dict would load half a LoRA.
    """
    from diffusers.utils import convert_unet_state_dict_to_peft

    return convert_unet_state_dict_to_peft(lora_state_dict)


@contextlib.contextmanager
def fast_init(device, dtype=torch.bfloat16):
    """Modules built inside are initialized directly on `device` in `dtype` (REFERENCE_MODELS.md §9: seconds
    on a GPU for FLUX's 12B parameters, no fp32 copy). Buffers are computed in their own dtypes (SD3's sin-cos
    table stays fp32, CLIP's position ids int64), so nothing needs repair as after a meta-device build."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device or "cpu"):
            yield
    finally:
        torch.set_default_dtype(previous)


def problems(config, family):
    """Start-up checks of the keys a flow-matching family reads (or must not be given)."""
    m, s = config.model, config.sample
    out = []
    if m.prediction_type:
        out.append(f"config.model.prediction_type={m.prediction_type!r}: {family.description} predicts flow "
                   f"velocity; leave it unset")
    if s.eta != 0:
        out.append(f"config.sample.eta={s.eta!r}: {family.description} samples with the deterministic flow-matching "
                   f"Euler step; set it to 0")
    length = m.get("max_sequence_length")
    if length is not None and not (isinstance(length, int) and 1 <= length <= MAX_SEQUENCE_LENGTH):
        out.append(f"config.model.max_sequence_length={length!r}: must be an int in [1, {MAX_SEQUENCE_LENGTH}] "
                   f"(unset: the pipeline's default)")
    limit = m.get("precompute_prompt_embeddings_max_gib", 0)
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit >= 0:
        out.append(f"config.model.precompute_prompt_embeddings_max_gib={limit!r}: must be a number >= 0 "
                   f"(0: encode each prompt when first drawn)")
    return out
