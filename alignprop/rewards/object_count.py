"""Object count: a soft, differentiable count of the prompt's object found by an open-vocabulary detector.

The detector is OWL-ViT (default `google/owlvit-base-patch32`) or OWLv2 from transformers; its text query
is `query.format(object)` ("a photo of a {}"). OWL-ViT scores each of its boxes (one per image patch) with
a logit; a box is a detection when sigmoid(logit) > threshold (as the processor's post-processing does).
The soft count replaces the step by a sigmoid in logit space:

    soft_count = sum over boxes of sigmoid((logit − logit(threshold)) / temperature)

so it equals the hard count when every logit is a few temperatures away from the threshold. Logit
space keeps the many background boxes (probabilities ~1e-3) from adding up to a spurious count.
Duplicates: of the 16 best boxes (GenEval's `max_objects`), a box whose IoU with a better detected box exceeds
`nms_iou` does not count: greedy NMS in expectation, box i kept with weight sigmoid_i x prod over better
overlapping j of (1 − kept_j), exactly greedy NMS when the weights are 0 or 1 (the hard count).

Reward = −|soft_count − count| (objects off; 0 is best). The absolute error, unlike the squared one,
keeps the gradient of a sample with many spurious boxes as large as that of a sample one object off,
so one bad sample does not dominate the batch. A sigmoid has no slope far from the threshold (2.7e-4 per logit
for an absent object's best box at p = 0.01), so the reward's gradient also gets `rank_weight` x a rank hinge
(`rank_hinge`: the `count` best distinct boxes pushed above the threshold, the others below, softplus, slope 1
per logit far away): 0.1 per logit there. It adds to the gradient only; the value stays −|soft − count|.
The prompt metadata must give `object` (singular noun) and `count` (see the `counting` prompt sets).

Logged beside it: `soft_count`, `count_error` (|hard count − count|) and `count_exact`, 1 when the hard count
equals the prompt's count. That is GenEval's counting rule (evaluation/evaluate_images.py: the 16 best boxes
above the threshold, greedy NMS at `max_overlap`, correct iff exactly `count` remain, accuracy = mean over
images), but with OWL-ViT, its threshold 0.1 and NMS at 0.5 instead of Mask2Former at 0.9 with no NMS, and with
our prompts: runs compare with each other, not with GenEval's SD 1.5 counting accuracy 0.35 (for that, run
GenEval's own evaluator on images of its prompts). Preprocessing as the detectors' processors: OWL-ViT
bicubic to a square, OWLv2 padded to a square (zeros) then Gaussian antialias and bilinear.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from alignprop.errors import ConfigError
from alignprop.rewards import Reward, towers
from alignprop.rewards.loading import load_pretrained
from alignprop.rewards.preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess, normalize
from alignprop.speed import prepare_scorer

TINY = "tiny"
# Boxes considered per image, best first: GenEval's `max_objects` (evaluate_images.py: the 16 best boxes above
# the threshold are kept before NMS), so a count saturates at 16.
TOP_K = 16


def box_iou(boxes):
    """Pairwise IoU of boxes [B, n, 4] given as (centre x, centre y, width, height), as OWL-ViT predicts: [B, n, n]."""
    corners = torch.cat([boxes[..., :2] - boxes[..., 2:] / 2, boxes[..., :2] + boxes[..., 2:] / 2], -1)
    top_left = torch.maximum(corners[..., :, None, :2], corners[..., None, :, :2])
    bottom_right = torch.minimum(corners[..., :, None, 2:], corners[..., None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    area = boxes[..., 2:].clamp(min=0).prod(-1)
    return inter / (area[..., :, None] + area[..., None, :] - inter).clamp(min=1e-12)


def _top_boxes(logits, boxes, nms_iou):
    """The TOP_K best logits [B, K] (descending) and which of them overlap each other by IoU > nms_iou [B, K, K]."""
    k = min(TOP_K, logits.shape[-1])
    top, order = logits.topk(k, -1)
    if boxes is None or nms_iou >= 1:
        return top, torch.zeros(*top.shape, k, dtype=torch.bool, device=top.device)
    boxes = boxes.detach().gather(1, order[..., None].expand(-1, -1, 4))
    return top, box_iou(boxes.float()) > nms_iou


def nms_weights(weights, overlap):
    """Greedy NMS in expectation: box i (sorted by score) is kept with probability weights_i times the chance that
    no kept better box overlaps it. [B, K], [B, K, K] -> [B, K]; with 0/1 weights, exactly greedy NMS."""
    survive = torch.ones_like(weights)
    kept = []
    for i, weight in enumerate(weights.unbind(-1)):
        kept.append(weight * survive[:, i])
        survive = survive * (1 - kept[-1][:, None] * overlap[:, i].to(weights))
    return torch.stack(kept, -1)


def soft_count(logits, threshold, temperature, boxes=None, nms_iou=1.0):
    """Differentiable count of boxes with sigmoid(logit) > threshold among the TOP_K best, less duplicates (greedy NMS
    at IoU `nms_iou` when `boxes` [B, boxes, 4] are given): logits [B, boxes] -> [B]."""
    top, overlap = _top_boxes(logits, boxes, nms_iou)
    weights = torch.sigmoid((top - math.log(threshold / (1 - threshold))) / temperature)
    return nms_weights(weights, overlap).sum(-1)


def hard_count(logits, threshold, boxes=None, nms_iou=1.0):
    """GenEval's count: boxes with sigmoid(logit) > threshold, the TOP_K best, greedy NMS: [B, boxes] -> [B]."""
    top, overlap = _top_boxes(logits.detach().float(), boxes, nms_iou)
    return nms_weights((torch.sigmoid(top) > threshold).float(), overlap).sum(-1)


def rank_hinge(logits, counts, threshold, temperature, boxes=None, nms_iou=1.0, margin=2.0):
    """Sum of softplus hinges (in units of `temperature`, slope 1 per logit far from the threshold) pushing the
    `count` best distinct boxes (hard NMS, ignoring the threshold) above the threshold and the other TOP_K ones
    below it: [B]. Unlike the sigmoid count, it keeps a gradient for an object with no box near the threshold."""
    top, overlap = _top_boxes(logits, boxes, nms_iou)
    distinct = nms_weights(torch.ones_like(top.detach()), overlap) > 0.5
    rank = distinct.long().cumsum(-1)  # 1 for the best distinct box, 2 for the next, ...
    z = (top - math.log(threshold / (1 - threshold))) / temperature
    wanted = rank <= counts[:, None]
    hinge = torch.where(wanted, F.softplus(margin - z), F.softplus(margin + z)) * temperature
    return (hinge * distinct).sum(-1)


class SoftCounter(nn.Module):
    """(images [B,3,H,W] in [0, 1], object names) -> box logits [B, boxes] of the query for each image. Frozen."""

    def __init__(self, detector, tokenizer, mean=CLIP_MEAN, std=CLIP_STD, query="a photo of a {}", pad_to_square=False):
        super().__init__()
        self.detector = detector
        self.tokenizer = tokenizer
        self.mean, self.std = tuple(mean), tuple(std)
        self.query = query
        # OWLv2's processor pads images to a square (bottom/right, zeros in [0, 1]) before resizing.
        self.pad_to_square = pad_to_square
        self.image_size = detector.config.vision_config.image_size
        self.max_length = detector.config.text_config.max_position_embeddings
        self.requires_grad_(False)
        self.eval()

    def forward(self, images, objects):
        return self.detect(images, objects)[0]

    def detect(self, images, objects):
        """Box logits [B, boxes] and boxes [B, boxes, 4] (centre x, centre y, width, height in [0, 1])."""
        param = next(self.parameters())
        if self.pad_to_square:
            pixels = owlv2_preprocess(images, self.image_size, self.mean, self.std).to(param.dtype)
        else:  # OWL-ViT's processor: straight to a square, bicubic (no crop: objects at the edges count)
            pixels = clip_preprocess(images.to(param.dtype), self.image_size, self.mean, self.std, mode="squash")
        tokens = self.tokenizer(
            [self.query.format(o) for o in objects],
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(param.device)
        # One query per image: input_ids [B, L] -> logits [B, boxes, 1].
        out = self.detector(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels)
        return out.logits[..., 0], out.pred_boxes


def gaussian_kernel(sigma):
    """torchvision's 1D Gaussian of `gaussian_blur`: 2 ceil(3 sigma) + 1 taps, normalized."""
    half = math.ceil(3 * sigma)
    x = torch.linspace(-half, half, 2 * half + 1)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def owlv2_preprocess(images, size, mean, std):
    """OWLv2's processor, differentiable: pad to a square (bottom/right, zeros), Gaussian antialias with
    sigma = (factor - 1) / 2 (reflect padding), bilinear resize without antialias, normalize (in fp32)."""
    images = images.float()
    h, w = images.shape[-2:]
    side = max(h, w)
    images = nn.functional.pad(images, (0, side - w, 0, side - h))
    sigma = max((side / size - 1) / 2, 0.0)
    if sigma > 0:
        kernel = gaussian_kernel(sigma).to(images.device)
        pad = len(kernel) // 2
        channels = images.shape[1]
        images = nn.functional.pad(images, (pad, pad, pad, pad), mode="reflect")
        images = nn.functional.conv2d(images, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
        images = nn.functional.conv2d(images, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)
    if side != size:
        images = nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return normalize(images, mean, std)


DETECTORS = {"owlvit": "OwlViTForObjectDetection", "owlv2": "Owlv2ForObjectDetection"}


def build_counter(cfg, seed=0):
    """The counter of `config.reward.object_count`: `model` (hub id, local folder or 'tiny') + its processor."""
    import transformers

    if cfg.model == TINY:
        from alignprop.tokenizers import clip_tokenizer

        return SoftCounter(towers.tiny_owlvit(seed), clip_tokenizer(), query=cfg.query)

    key = "config.reward.object_count.model"
    model_config = load_pretrained(transformers.AutoConfig, cfg.model, key=key)
    if model_config.model_type not in DETECTORS:
        raise ConfigError(
            f"{key}={cfg.model!r} is a {model_config.model_type!r} model; object_count needs one of "
            f"{', '.join(DETECTORS)} (e.g. 'google/owlvit-base-patch32', 'google/owlv2-base-patch16-ensemble')."
        )
    detector = load_pretrained(getattr(transformers, DETECTORS[model_config.model_type]), cfg.model, key=key)
    processor = load_pretrained(
        transformers.AutoProcessor, cfg.processor or cfg.model, key="config.reward.object_count.processor"
    )
    return SoftCounter(
        detector,
        processor.tokenizer,
        mean=processor.image_processor.image_mean,
        std=processor.image_processor.image_std,
        query=cfg.query,
        pad_to_square=model_config.model_type == "owlv2",
    )


def parse_count(value):
    """A prompt's `count` metadata as an int >= 0 (3, 3.0 and "3" are 3), or None when it is not a whole number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return int(value) if value >= 0 else None
    return None


def metadata_problem(metadata):
    """Why one prompt's metadata cannot be scored (no object name, no whole-number count), or None."""
    missing = [k for k in ("object", "count") if k not in metadata]
    if missing:
        return f"has no {' and no '.join(repr(k) for k in missing)} in its metadata {metadata!r}"
    if not isinstance(metadata["object"], str) or not metadata["object"].strip():
        return f"has 'object': {metadata['object']!r}; it must be an object name such as 'apple'"
    if parse_count(metadata["count"]) is None:
        return f"has 'count': {metadata['count']!r}; it must be a whole number >= 0 such as 3"
    return None


def count_reward(logits, boxes, counts, cfg):
    """Rewards [B] and info of box logits [B, boxes], boxes [B, boxes, 4] and the prompts' counts [B]."""
    soft = soft_count(logits, cfg.threshold, cfg.temperature, boxes, cfg.nms_iou)
    hard = hard_count(logits, cfg.threshold, boxes, cfg.nms_iou)
    error = (hard - counts).abs()
    info = {"soft_count": soft.detach(), "count_error": error, "count_exact": (hard == counts).float()}
    rewards = -(soft - counts).abs()
    if cfg.rank_weight:
        # Gradient only: the value stays −|soft count − count| (objects off), the slope gains the hinge's.
        hinge = cfg.rank_weight * rank_hinge(logits, counts, cfg.threshold, cfg.temperature, boxes, cfg.nms_iou)
        rewards = rewards - (hinge - hinge.detach())
    return rewards, info


def build(cfg, seed=0, device=None, dtype=None):
    counter = prepare_scorer(build_counter(cfg, seed), device, dtype)

    def reward_fn(images, prompts, metadata):
        logits, boxes = counter.detect(images, [m["object"] for m in metadata])
        counts = torch.tensor([float(parse_count(m["count"])) for m in metadata], device=logits.device)
        return count_reward(logits.float(), boxes, counts, cfg)

    return reward_fn


def problems(cfg, prefix):
    checks = [
        (
            "query",
            isinstance(cfg.query, str) and "{}" in cfg.query,
            "must contain '{}' for the object name, e.g. 'a photo of a {}'",
        ),
        ("threshold", 0 < cfg.threshold < 1, "must be a probability in (0, 1), e.g. 0.1"),
        ("temperature", cfg.temperature > 0, "must be > 0 (logit units), e.g. 0.25"),
        ("nms_iou", 0 < cfg.nms_iou <= 1, "must be an IoU in (0, 1] (1: no NMS), e.g. 0.5"),
        ("rank_weight", cfg.rank_weight >= 0, "must be >= 0 (0: no hinge gradient), e.g. 0.1"),
    ]
    out = [f"{prefix}.{key}={cfg[key]!r}: {why}" for key, ok, why in checks if not ok]
    if cfg.model == "random":
        out.append(
            f"{prefix}.model='random': this reward has no built-in architecture to initialize randomly; give its "
            f"weights (hub id or folder) or 'tiny'"
        )
    return out


REWARDS = (
    Reward(
        "object_count",
        "object_count",
        build,
        "−|soft count − count| of OWL-ViT detections of the prompt's object (0 is best)",
        problems=problems,
        metadata=("object", "count"),
        metadata_problem=metadata_problem,
    ),
)
