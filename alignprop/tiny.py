"""Tiny random Stable Diffusion components and an offline CLIP tokenizer.

One builder serves the `tiny` config and the tests: every component is built from a config with
seeded random weights, so nothing is downloaded. The tokenizer is the real CLIP BPE tokenizer, built
from the vocabulary file that open_clip_torch ships inside its package.
"""

import functools
import gzip
import os

from alignprop.rng import seeded

# Sizes of the tiny models. Small enough for a CPU run in seconds, large enough to have every kind
# of block the real SD 1.x UNet has (down/up, cross-attention, mid block).
TINY_TEXT_HIDDEN = 32
TINY_CLIP_MAX_LENGTH = 77
CLIP_VOCAB_SIZE = 49408


def _bytes_to_unicode():
    """GPT-2 / CLIP byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


@functools.lru_cache(maxsize=1)
def _clip_vocab_and_merges():
    import importlib.util

    # Located without importing open_clip (whose import pulls in timm and torchvision).
    package = importlib.util.find_spec("open_clip")
    if package is None:
        raise ModuleNotFoundError("the offline CLIP tokenizer needs open_clip_torch (`pip install open_clip_torch`)")
    path = os.path.join(package.submodule_search_locations[0], "bpe_simple_vocab_16e6.txt.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # Line 0 is a version header; CLIP uses merges 1..48894 (49152 - 256 - 2), as open_clip does.
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return vocab, merges


def clip_tokenizer():
    """The real CLIP tokenizer (49408 tokens, max length 77), built offline."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    # model_max_length must be set: without it padding to max_length overflows.
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=TINY_CLIP_MAX_LENGTH)


def tiny_clip_text_config(max_positions=TINY_CLIP_MAX_LENGTH, pad_token_id=49407):
    """A tiny CLIP text tower over the real 49408-token vocabulary (SD text encoder, reward text towers)."""
    return dict(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=TINY_TEXT_HIDDEN,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=max_positions,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=pad_token_id,
    )


def tiny_unet_config():
    return dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def build_tiny_components(seed=0):
    """Tiny SD 1.x-shaped components with seeded random weights: a dict like a pipeline's components."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with seeded(seed):
        unet = UNet2DConditionModel(**tiny_unet_config())
    with seeded(seed + 1):
        vae = AutoencoderKL(
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
    with seeded(seed + 2):
        text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_clip_text_config()))
    # The SD 1.5 scheduler config (not DDIMScheduler() defaults, which are wrong for SD).
    scheduler = DDIMScheduler(**SD15_SCHEDULER_CONFIG)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), scheduler=scheduler)


# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json, as DDIM.
SD15_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


def tiny_clip_vision_config():
    """A tiny CLIP (text + vision) config for reward models; the vision tower sees 32x32 images."""
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=tiny_clip_text_config(),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=32,
    )


def build_tiny_clip(seed=0):
    from transformers import CLIPModel

    with seeded(seed):
        return CLIPModel(tiny_clip_vision_config())


# A tiny open_clip CLIP in open_clip's model-config schema (model_configs/*.json): the HPS reward's
# `tiny` model, and the config tests register with `open_clip.add_model_config` to test the real loader.
TINY_OPEN_CLIP_CONFIG = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, layers=2, width=32, head_width=16, patch_size=8),
    text_cfg=dict(context_length=TINY_CLIP_MAX_LENGTH, vocab_size=CLIP_VOCAB_SIZE, width=32, heads=4, layers=2),
)


def build_tiny_open_clip(seed=0):
    """A tiny open_clip CLIP (output_dict=True) with seeded random weights; the global RNG is left as it was."""
    import copy

    import open_clip

    with seeded(seed):
        return open_clip.model.CLIP(**copy.deepcopy(TINY_OPEN_CLIP_CONFIG), output_dict=True)


def tiny_owlvit_config():
    """A tiny OWL-ViT detector config: 32x32 images in 8x8 patches (16 boxes), 16-token text queries."""
    from transformers import OwlViTConfig

    return OwlViTConfig(
        text_config=tiny_clip_text_config(max_positions=16, pad_token_id=0),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=32,
    )


def build_tiny_owlvit(seed=0):
    """A tiny OwlViTForObjectDetection with seeded random weights; the global RNG is left as it was."""
    from transformers import OwlViTForObjectDetection

    with seeded(seed):
        return OwlViTForObjectDetection(tiny_owlvit_config())
