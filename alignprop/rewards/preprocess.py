"""Differentiable image preprocessing of the reward models, each with the geometry of its official processor.

All resizing is bicubic with antialias (PIL's filter, a = -0.5, widened when downsampling), as PIL, the
torchvision transforms on PIL images and transformers' image processors do; it keeps a gradient on every
input pixel. Sizes and offsets are rounded as the references round them:

- `shortest_side` (transformers' CLIPImageProcessor, torchvision `Resize(int)`): the short side to `size`,
  the long side `int(size * long / short)` (512x701 -> 224x306), then a centre crop whose offset is
  `(excess) // 2` (transformers, `crop="floor"`) or `round(excess / 2)` (torchvision `CenterCrop`, `"round"`).
- `letterbox` (HPSv2's `ResizeMaxSize`): the long side to `size`, the short side `round(short * size / long)`,
  zero padding (black, before normalization), `pad // 2` on the top/left.
- `squash` (OWL-ViT): straight to `size` x `size`.
"""

import torch
import torch.nn.functional as F

# OpenAI CLIP normalization constants (also used by open_clip's OpenAI/LAION towers).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (torch.float16, torch.bfloat16)


def resize(images, size):
    """[B,C,H,W] in [0, 1] -> [B,C,*size], bicubic with antialias as PIL resamples, in the input's dtype.

    PIL resizes the width, then the height, clipping to [0, 255] after each pass; so does this (clamping to
    [0, 1]), which removes bicubic's overshoot at sharp edges (up to 15/255 on photographs otherwise). A
    clamped pixel passes no gradient; every input pixel still gets one through its other output pixels.
    PyTorch has no antialiased kernel for half types on the CPU (NotImplementedError), so there the resize
    is computed in fp32 and cast back: the fp32 result rounded to the half type.
    """
    size = tuple(int(s) for s in size)
    if tuple(images.shape[-2:]) == size:
        return images
    dtype = images.dtype
    out = images.float() if images.device.type == "cpu" and dtype in HALF else images
    for pass_size in ((out.shape[-2], size[1]), size):  # width first, as PIL
        if tuple(out.shape[-2:]) != pass_size:
            out = F.interpolate(out, size=pass_size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    return out.to(dtype)


def shortest_side_size(height, width, size):
    """(h, w) after resizing the shorter side to `size`, the longer side truncated as torchvision/transformers do."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def center_crop(images, size, crop="floor"):
    """The centre `size` x `size` of [..., H, W]; `crop` rounds the offset: "floor" (transformers) or "round"
    (torchvision `CenterCrop`, Python's round: half to even)."""
    h, w = images.shape[-2:]
    if crop == "floor":
        top, left = (h - size) // 2, (w - size) // 2
    else:
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return images[..., top : top + size, left : left + size]


def letterbox(images, size):
    """HPSv2's `ResizeMaxSize(size, fill=0)`: longer side to `size`, zero padding to `size` x `size`."""
    h, w = images.shape[-2:]
    scale = size / max(h, w)
    new_h, new_w = round(h * scale), round(w * scale)
    images = resize(images, (new_h, new_w))
    pad_h, pad_w = size - new_h, size - new_w
    # (The official transform skips padding when the long side is already `size`; the tower needs a square.)
    return F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


def normalize(images, mean=CLIP_MEAN, std=CLIP_STD):
    mean = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    std = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean) / std


def clip_preprocess(images, size, mean=CLIP_MEAN, std=CLIP_STD, mode="shortest", crop="floor"):
    """[0, 1] NCHW images -> normalized `size` x `size` tower input, differentiable end to end.

    `mode`: "shortest" (resize the shorter side, centre crop with offset rounding `crop`), "letterbox"
    (HPSv2) or "squash" (detectors such as OWL-ViT: objects at the edges are kept).
    """
    if mode == "shortest":
        images = center_crop(resize(images, shortest_side_size(*images.shape[-2:], size)), size, crop)
    elif mode == "letterbox":
        images = letterbox(images, size)
    elif mode == "squash":
        images = resize(images, (size, size))
    else:
        raise ValueError(f"clip_preprocess mode={mode!r}; valid: shortest, letterbox, squash")
    return normalize(images, mean, std)
