"""JPEG compressibility: a differentiable surrogate of the JPEG file size of an image.

The reward of DDPO/AlignProp's compressibility experiment is the JPEG size; a real encoder is not
differentiable (rounding, Huffman tables), so the surrogate follows the baseline JPEG pipeline
(ITU-T T.81) and replaces the two non-differentiable parts by smooth estimates:

    RGB -> YCbCr (JFIF), chroma 4:2:0 (2x2 mean) -> 8x8 block DCT -> divide by the standard quantization
    tables scaled to `quality` (IJG scaling) -> estimated bits per coefficient -> kB

Bits of a quantized coefficient q: a nonzero coefficient costs its magnitude bits plus a Huffman code
for (zero run, size) of a few bits; a coefficient that rounds to zero costs almost nothing (it is part of
a run or the end-of-block code). Smoothly: `log2(1 + |q|) + run_bits * (1 - exp(-(|q| / 0.5)^2))`.
DC coefficients are coded as differences from the previous block (DPCM), as in JPEG.

`compressibility` = −size, `incompressibility` = +size; the true size of a quality-`quality` JPEG
written by Pillow (detached uint8 images) is logged as `jpeg_kb`. The surrogate ranks images like the
real encoder (Spearman >= 0.9 on photographs and their blurred/sharpened/noisy/resized variants, see
tests/test_rewards_compressibility.py); its scale is calibrated to be close to kB at quality 95.
"""

import io

import torch
import torch.nn.functional as F

from alignprop.rewards import Reward

# ITU-T T.81 Annex K.1, Tables K.1 (luminance) and K.2 (chrominance), in row-major (not zigzag) order.
LUMA_QUANT = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
CHROMA_QUANT = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
)

# Average Huffman code length of a nonzero coefficient's (run, size) symbol, in bits. 4 makes the
# surrogate close to kB (Pillow/libjpeg size ratio 0.97 +- 0.07 at quality 95 on the test photographs);
# the ranking hardly depends on it (Spearman 0.99-0.997 for any value in 0..6).
RUN_BITS = 4.0
# Fixed cost of a block (end-of-block code), bits.
BLOCK_BITS = 4.0


def quant_table(base, quality):
    """The IJG (libjpeg `jpeg_quality_scaling`) table for `quality` in [1, 100], as Pillow uses it."""
    quality = min(max(int(quality), 1), 100)
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    table = torch.tensor(base, dtype=torch.float64)
    return ((table * scale + 50) // 100).clamp(1, 255).float()


def rgb_to_ycbcr(images):
    """[B,3,H,W] RGB in [0, 255] -> YCbCr (JFIF, full range), each channel centred on 0 as JPEG codes it."""
    r, g, b = images.unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * b - 128
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b
    return y.unsqueeze(1), torch.stack([cb, cr], 1)


def dct_matrix(n=8, dtype=torch.float32, device=None):
    """Orthonormal DCT-II matrix: `D @ x @ D.T` is JPEG's 2D forward DCT of an n x n block."""
    k = torch.arange(n, dtype=torch.float64).view(-1, 1)
    i = torch.arange(n, dtype=torch.float64).view(1, -1)
    d = torch.cos(torch.pi * (2 * i + 1) * k / (2 * n)) * (2 / n) ** 0.5
    d[0] /= 2**0.5
    return d.to(device=device, dtype=dtype)


def block_dct(planes):
    """[B,C,H,W] -> [B,C,H/8,W/8,8,8] DCT coefficients; edges padded by replication as libjpeg does."""
    h, w = planes.shape[-2:]
    planes = F.pad(planes, (0, -w % 8, 0, -h % 8), mode="replicate")
    b, c, h, w = planes.shape
    blocks = planes.reshape(b, c, h // 8, 8, w // 8, 8).transpose(3, 4)
    d = dct_matrix(dtype=planes.dtype, device=planes.device)
    return d @ blocks @ d.T


def _smooth_abs(x, eps=1e-3):
    return (x * x + eps * eps).sqrt()


def coefficient_bits(q):
    """Smooth estimate of the bits JPEG spends on quantized coefficients `q` (any shape)."""
    a = _smooth_abs(q)
    nonzero = 1 - torch.exp(-((a / 0.5) ** 2))  # ~0 for coefficients that round to zero, ~1 otherwise
    return torch.log2(1 + a) + RUN_BITS * nonzero


def plane_bits(planes, table):
    """Estimated bits of [B,C,H,W] centred planes quantized by `table` [8,8]: [B]."""
    q = block_dct(planes) / table.to(planes)
    dc = q[..., 0, 0].flatten(2)  # [B, C, blocks] in raster order
    dc_diff = torch.cat([dc[..., :1], dc[..., 1:] - dc[..., :-1]], -1)  # DPCM, as JPEG codes DC
    ac = q.flatten(-2)[..., 1:]
    bits = coefficient_bits(dc_diff).sum((1, 2)) + coefficient_bits(ac).sum((1, 2, 3, 4))
    return bits + BLOCK_BITS * dc.shape[1] * dc.shape[2]


def jpeg_size_surrogate(images, quality=95):
    """Differentiable estimate of the JPEG file size (kB) of [B,3,H,W] images in [0, 1]: [B]."""
    images = images.float() * 255
    luma, chroma = rgb_to_ycbcr(images)
    chroma = F.avg_pool2d(F.pad(chroma, (0, chroma.shape[-1] % 2, 0, chroma.shape[-2] % 2), mode="replicate"), 2)
    bits = plane_bits(luma, quant_table(LUMA_QUANT, quality)) + plane_bits(chroma, quant_table(CHROMA_QUANT, quality))
    return bits / 8 / 1000


def jpeg_kb(images, quality=95):
    """True JPEG size (kB) written by Pillow for [B,3,H,W] images in [0, 1] (detached, uint8): [B] float32."""
    import numpy as np
    from PIL import Image

    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


def _builder(sign):
    """`sign` x the surrogate JPEG size (kB); the true Pillow size is logged as `jpeg_kb`."""

    def build(cfg, seed=0, device=None, dtype=None):
        def reward_fn(images, prompts, metadata):
            size = jpeg_size_surrogate(images, cfg.quality)
            return sign * size, {"jpeg_kb": jpeg_kb(images, cfg.quality).to(size.device)}

        return reward_fn

    return build


def problems(cfg, prefix):
    if not 1 <= cfg.quality <= 100:
        return [f"{prefix}.quality={cfg.quality!r}: must be a JPEG quality in [1, 100]"]
    return []


REWARDS = (
    Reward("compressibility", "compressibility", _builder(-1.0), "minus the differentiable JPEG-size estimate (kB)",
           problems=problems),
    Reward("incompressibility", "compressibility", _builder(1.0), "the differentiable JPEG-size estimate (kB)",
           problems=problems),
)
