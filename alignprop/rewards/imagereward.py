"""ImageReward v1.0 (Xu et al. 2023, THUDM/ImageReward): BLIP's image-grounded text encoder -> MLP -> z-score.

The official model (ImageReward/ImageReward.py, `score_gard`) embeds the image with BLIP's ViT-L/16
(224 px, all 197 tokens), runs BLIP's BERT text encoder (med.py: 12 layers, cross-attention to the image
tokens in each) over the prompt (bert-base-uncased, padded to 35 tokens), feeds the [CLS] state to the
LAION-style MLP 768->1024->128->64->16->1, and standardizes: (r - 0.16717362830052426) / 1.0333394966054072
(about -2..2; 0 is the mean of its training images). This module runs the same computation on
transformers' BLIP towers (`BlipVisionModel`, `BlipTextModel`), the official state dict converted
key by key; images are preprocessed as its torchvision transform (bicubic shorter side, centre crop
with the offset rounded as `CenterCrop`).

Weights: hub repo `THUDM/ImageReward`, `ImageReward.pt` (a state dict), or `config.reward.imagereward.path`;
`model="tiny"` builds tiny random towers offline.
"""

import torch
from torch import nn

from alignprop.rewards import Reward
from alignprop.rewards.aesthetic import AestheticMLP
from alignprop.rewards.loading import BadWeightsError, hub_file, load_pretrained
from alignprop.rewards.preprocess import clip_preprocess
from alignprop.rng import seeded
from alignprop.speed import prepare_scorer

TINY = "tiny"
SCORE_MEAN, SCORE_STD = 0.16717362830052426, 1.0333394966054072
MAX_LENGTH = 35  # the official tokenization: padding="max_length", truncation, 35 tokens
# BLIP ViT-L/16 (BLIP/blip.py `create_vit('large', 224)`) and med_config.json with encoder_width 1024.
VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
              patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu")
TEXT = dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=512, layer_norm_eps=1e-12, hidden_act="gelu", encoder_hidden_size=1024)
TINY_VISION = dict(VISION, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                   image_size=32, patch_size=8)
TINY_TEXT = dict(TEXT, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=64, encoder_hidden_size=32, bos_token_id=2, sep_token_id=3)

# Official BLIP vit.py block names -> transformers' BlipVisionModel; the text encoder's names are the same in both.
BLOCK_KEYS = ((".norm1.", ".layer_norm1."), (".norm2.", ".layer_norm2."), (".attn.qkv.", ".self_attn.qkv."),
              (".attn.proj.", ".self_attn.projection."))
VISION_KEYS = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
               "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
               "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
               "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}


def _vision_key(name):
    if name.startswith("blocks."):
        name = "encoder.layers." + name.removeprefix("blocks.")
        for old, new in BLOCK_KEYS:
            name = name.replace(old, new)
        return name
    return VISION_KEYS.get(name, name)


def convert_state_dict(state):
    """The official ImageReward state dict -> (vision, text, mlp) state dicts of this module's towers."""
    vision, text, mlp = {}, {}, {}
    for key, tensor in state.items():
        if key.startswith("blip.visual_encoder."):
            vision[_vision_key(key.removeprefix("blip.visual_encoder."))] = tensor
        elif key.startswith("blip.text_encoder."):
            text[key.removeprefix("blip.text_encoder.")] = tensor
        elif key.startswith("mlp."):
            mlp[key.removeprefix("mlp.")] = tensor
    text.pop("embeddings.position_ids", None)  # a buffer of med.py's BertEmbeddings
    return vision, text, mlp


def build_towers(vision_cfg, text_cfg, device=None):
    """BLIP's vision tower, text encoder (with cross-attention) and the MLP, random weights (global RNG)."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    with torch.device(device or "cpu"):
        vision = BlipVisionModel(BlipVisionConfig(**vision_cfg))
        # is_decoder=True only builds the cross-attention layers; the forward runs bidirectionally (is_decoder=False).
        text = BlipTextModel(BlipTextConfig(**text_cfg, is_decoder=True), add_pooling_layer=False)
        mlp = AestheticMLP(text_cfg["hidden_size"])
    return vision, text, mlp


class ImageRewardScorer(nn.Module):
    """(images [B,3,H,W] in [0, 1], prompts) -> ImageReward [B]. Frozen, differentiable w.r.t. the images."""

    def __init__(self, vision, text, mlp, tokenizer):
        super().__init__()
        self.vision, self.text, self.mlp, self.tokenizer = vision, text, mlp, tokenizer
        self.image_size = vision.config.image_size
        self.requires_grad_(False)
        self.eval()

    def forward(self, images, prompts):
        param = next(self.parameters())
        pixels = clip_preprocess(images.to(param.dtype), self.image_size, crop="round")
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_LENGTH,
                                return_tensors="pt").to(param.device)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=param.device)
        hidden = self.text(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                           encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask,
                           is_decoder=False).last_hidden_state
        rewards = self.mlp(hidden[:, 0]).squeeze(-1)
        return (rewards - SCORE_MEAN) / SCORE_STD


def load_weights(towers, path, key):
    """Load the official state dict at `path` into (vision, text, mlp), strictly; errors name `key`."""
    from alignprop.rewards.aesthetic import load_mlp_state_dict

    fix = f"Point {key} at a good copy of ImageReward.pt (hub repo THUDM/ImageReward)."
    state = load_mlp_state_dict(path, fix)  # torch.load with the same corrupt/missing-file errors
    for module, part, name in zip(towers, convert_state_dict(state), ("image tower", "text encoder", "MLP")):
        try:
            module.load_state_dict(part, strict=True)
        except RuntimeError as e:
            raise BadWeightsError(f"{key}={path!r} does not fit ImageReward's {name} (is it ImageReward.pt?): "
                                  f"{' '.join(str(e).split())[:400]} {fix}") from e


def build_scorer(cfg, seed=0, device=None):
    """The scorer of `config.reward.imagereward`: 'tiny' (tiny random towers, or `path` loaded into them) or the
    official weights (`path`, else `repo`/`file` from the hub) with the `tokenizer` (bert-base-uncased)."""
    key = "config.reward.imagereward.path"
    if cfg.model == TINY:
        from alignprop.tokenizers import tiny_bert_tokenizer

        tokenizer = tiny_bert_tokenizer()
        with seeded(seed):
            towers = build_towers(TINY_VISION, dict(TINY_TEXT, vocab_size=len(tokenizer)))
        if cfg.path:
            load_weights(towers, cfg.path, key)
        return ImageRewardScorer(*towers, tokenizer)
    from transformers import BertTokenizer

    path = cfg.path or hub_file(cfg.repo, cfg.file, key=key)
    tokenizer = load_pretrained(BertTokenizer, cfg.tokenizer, key="config.reward.imagereward.tokenizer")
    # BLIP's init_tokenizer adds these two (vocabulary 30522 -> 30524, the embedding's size).
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    # Built without initializing (1 GB of weights), then every tensor loaded from the checkpoint.
    towers = [module.to_empty(device="cpu") for module in build_towers(VISION, TEXT, device="meta")]
    load_weights(towers, path, key)
    return ImageRewardScorer(*towers, tokenizer)


def build(cfg, seed=0, device=None, dtype=None):
    scorer = prepare_scorer(build_scorer(cfg, seed, device), device, dtype)

    def reward_fn(images, prompts, metadata):
        return scorer(images, prompts).float(), {}

    return reward_fn


ARCHITECTURE = "ImageReward-v1.0"


def problems(cfg, prefix):
    if cfg.model not in (TINY, ARCHITECTURE):
        return [f"{prefix}.model={cfg.model!r}: must be {ARCHITECTURE!r} (BLIP ViT-L/16 + BERT, the official "
                f"architecture) or 'tiny' (tiny random towers, offline)"]
    return []


REWARDS = (
    Reward("imagereward", "imagereward", build,
           "ImageReward v1.0: BLIP image-grounded text encoder -> MLP, z-scored (about -2..2)", problems=problems),
)
