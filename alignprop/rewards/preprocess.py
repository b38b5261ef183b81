"""Differentiable CLIP preprocessing shared by every CLIP-based scorer."""

import torch
import torch.nn.functional as F

# OpenAI CLIP normalization constants (also used by open_clip's OpenAI/LAION towers).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(images, size, mean=CLIP_MEAN, std=CLIP_STD, crop=True):
    """[0, 1] NCHW images -> CLIP input: resize shorter side to `size` (bilinear, antialias), center crop, normalize.

    With `crop=False` the image is resized to `size` x `size` whatever its aspect ratio (as detectors such
    as OWL-ViT do). Differentiable end to end, unlike the PIL-based processors of transformers/open_clip.
    """
    h, w = images.shape[-2:]
    if crop:
        scale = size / min(h, w)
        new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    else:
        new_h, new_w = size, size
    if (new_h, new_w) != (h, w):
        images = F.interpolate(images, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    images = images[..., top : top + size, left : left + size]
    mean = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    std = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean) / std
