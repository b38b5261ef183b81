"""Text-image similarity of a transformers CLIP: CLIP score and PickScore.

- `clipscore`: the reward (training signal, and the logged `reward/clipscore`) is the cosine of the image
  and prompt embeddings of a CLIP (default `openai/clip-vit-large-patch14`), in [-1, 1] (about 0.2-0.35
  for matching real images): it keeps a gradient everywhere. The number papers and torchmetrics report,
  CLIP score = 100 x max(cosine, 0) (about 20-35), is logged beside it as `clipscore/clip_score`.
- `pickscore`: PickScore v1 (Kirstain et al. 2023), a CLIP ViT-H/14 fine-tuned on Pick-a-Pic human
  preferences: `logit_scale.exp()` x cosine (about 18-23 for real images). Weights
  `yuvalkirstain/PickScore_v1`, tokenizer and normalization from `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`.

Both preprocess as transformers' CLIPImageProcessor (which torchmetrics and PickScore's code use): shorter
side to the tower's size (bicubic), centre crop with the offset rounded down.
"""

import torch
from torch import nn

from alignprop.rewards import Reward, towers
from alignprop.rewards.loading import load_pretrained
from alignprop.rewards.preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess
from alignprop.speed import prepare_scorer

TINY = "tiny"


def projected_embeds(output):
    """The projected embedding [B, projection_dim] from `CLIPModel.get_{image,text}_features`.

    transformers 5 returns a BaseModelOutputWithPooling whose `pooler_output` is the projection
    (not the tower's pooled hidden state); transformers 4 returned the tensor itself.
    """
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class CLIPSimilarityScorer(nn.Module):
    """(images [B,3,H,W] in [0, 1], prompts) -> [B] cosine (x logit scale if `use_logit_scale`). Frozen."""

    def __init__(self, model, tokenizer, mean=CLIP_MEAN, std=CLIP_STD, use_logit_scale=False):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.mean, self.std = tuple(mean), tuple(std)
        self.use_logit_scale = use_logit_scale
        self.image_size = model.config.vision_config.image_size
        self.max_length = model.config.text_config.max_position_embeddings
        self.requires_grad_(False)
        self.eval()

    def embed_images(self, images):
        """[B,3,H,W] in [0, 1] -> L2-normalized projected image embeddings [B, D]."""
        param = next(self.parameters())
        pixels = clip_preprocess(images.to(param.dtype), self.image_size, self.mean, self.std)
        embeds = projected_embeds(self.model.get_image_features(pixel_values=pixels))
        return embeds / embeds.norm(dim=-1, keepdim=True)

    def embed_prompts(self, prompts):
        """Prompts -> L2-normalized projected text embeddings [B, D]."""
        tokens = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(next(self.parameters()).device)
        embeds = projected_embeds(
            self.model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        )
        return embeds / embeds.norm(dim=-1, keepdim=True)

    def forward(self, images, prompts):
        scores = (self.embed_images(images) * self.embed_prompts(prompts)).sum(-1)
        if self.use_logit_scale:
            scores = self.model.logit_scale.exp() * scores
        return scores


def build_scorer(cfg, key, use_logit_scale, seed=0):
    """Scorer of `config.reward.<key>`: `model` (hub id, local folder or 'tiny') + `processor` (tokenizer and
    normalization)."""
    if cfg.model == TINY:
        from alignprop.tokenizers import clip_tokenizer

        return CLIPSimilarityScorer(towers.tiny_clip(seed), clip_tokenizer(), use_logit_scale=use_logit_scale)

    from transformers import AutoProcessor, CLIPModel

    model = load_pretrained(CLIPModel, cfg.model, key=f"config.reward.{key}.model")
    processor = load_pretrained(AutoProcessor, cfg.processor or cfg.model, key=f"config.reward.{key}.processor")
    image_processor = processor.image_processor
    return CLIPSimilarityScorer(
        model,
        processor.tokenizer,
        mean=image_processor.image_mean,
        std=image_processor.image_std,
        use_logit_scale=use_logit_scale,
    )


def clip_score(cosine):
    """The CLIP score of torchmetrics and the papers: 100 x max(cosine, 0)."""
    return 100 * cosine.clamp(min=0)


def _builder(key, use_logit_scale):
    def build(cfg, seed=0, device=None, dtype=None):
        scorer = prepare_scorer(build_scorer(cfg, key, use_logit_scale, seed), device, dtype)

        def reward_fn(images, prompts, metadata):
            scores = scorer(images, prompts).float()
            return scores, ({} if use_logit_scale else {"clip_score": clip_score(scores.detach())})

        return reward_fn

    return build


def problems(cfg, prefix):
    if cfg.model == "random":
        return [
            f"{prefix}.model='random': this reward has no built-in architecture to initialize randomly; give its "
            f"weights (hub id or folder) or 'tiny'"
        ]
    return []


REWARDS = (
    Reward(
        "clipscore",
        "clipscore",
        _builder("clipscore", False),
        "cosine of CLIP image and prompt embeddings (about 0.2-0.35); logs the CLIP score 100 x max(cos, 0)",
        problems=problems,
    ),
    Reward(
        "pickscore",
        "pickscore",
        _builder("pickscore", True),
        "PickScore v1: logit_scale.exp() x cosine (about 18-23)",
        problems=problems,
    ),
)
