"""The differentiable JPEG-size surrogate: JPEG's building blocks, and its ranking against a real encoder."""

import io

import numpy as np
import pytest
import skimage.data as skimage_data  # test extra: pip install -e .[test]
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import stats

from alignprop.rewards import compressibility as jpeg
from helpers import make_reward

# Photographs shipped inside scikit-image (no download): portraits, animals, food, textures,
# astronomy, microscopy, objects; grayscale ones are replicated to RGB.
PHOTOS = (
    "astronaut", "camera", "chelsea", "coffee", "coins", "moon", "grass", "gravel", "brick",
    "hubble_deep_field", "immunohistochemistry", "rocket",
)
SIZE = 128


def _photo(name):
    array = getattr(skimage_data, name)()
    if array.ndim == 2:
        array = np.stack([array] * 3, -1)
    image = torch.from_numpy(np.ascontiguousarray(array[..., :3])).permute(2, 0, 1).float()[None] / 255
    h, w = image.shape[-2:]
    side = min(h, w)
    image = image[..., (h - side) // 2 : (h - side) // 2 + side, (w - side) // 2 : (w - side) // 2 + side]
    return F.interpolate(image, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)[0]


def _blur(image, sigma):
    radius = int(3 * sigma)
    kernel = torch.exp(-(torch.arange(-radius, radius + 1).float() ** 2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).view(1, 1, 1, -1).repeat(3, 1, 1, 1)
    x = F.pad(image[None], (radius,) * 4, mode="reflect")
    x = F.conv2d(F.conv2d(x, kernel, groups=3), kernel.transpose(2, 3), groups=3)
    return x[0]


def _variants(image, generator):
    """The photo, blurred, sharpened (unsharp mask), noisy, and down-then-up resized."""
    small = F.interpolate(image[None], size=(SIZE // 4, SIZE // 4), mode="bilinear", antialias=True)
    return [
        image,
        _blur(image, 1.5),
        (2 * image - _blur(image, 1.0)).clamp(0, 1),
        (image + torch.randn(image.shape, generator=generator) * 8 / 255).clamp(0, 1),
        F.interpolate(small, size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0].clamp(0, 1),
    ]


@pytest.fixture(scope="module")
def test_images():
    generator = torch.Generator().manual_seed(0)
    return torch.stack([v for name in PHOTOS for v in _variants(_photo(name), generator)])


def _pillow_kb(images, quality):
    sizes = []
    for image in images:
        array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(len(buffer.getvalue()) / 1000)
    return np.array(sizes)


def test_surrogate_ranks_images_like_pillow_jpeg(test_images):
    assert len(test_images) >= 40
    true_kb = _pillow_kb(test_images, 95)
    estimate = jpeg.jpeg_size_surrogate(test_images, 95).numpy()
    rho = stats.spearmanr(estimate, true_kb).correlation
    ratio = estimate / true_kb
    print(
        f"\nJPEG surrogate vs Pillow quality 95 on {len(test_images)} images: Spearman {rho:.4f}, "
        f"surrogate/true size {ratio.mean():.3f} +- {ratio.std():.3f} (true {true_kb.min():.1f}-{true_kb.max():.1f} kB)"
    )
    assert rho >= 0.9
    # kB-like units: within a factor 2 of the real size.
    assert 0.5 < ratio.mean() < 2


def test_quant_table_follows_ijg_scaling():
    torch.testing.assert_close(jpeg.quant_table(jpeg.LUMA_QUANT, 50), torch.tensor(jpeg.LUMA_QUANT).float())
    q95 = jpeg.quant_table(jpeg.LUMA_QUANT, 95)  # scale 10%: 16 -> 2, 99 -> 10
    assert q95[0, 0] == 2 and q95[7, 7] == 10 and q95.min() >= 1
    assert (jpeg.quant_table(jpeg.CHROMA_QUANT, 1) == 255).all()


def test_block_dct_is_jpeg_fdct():
    d = jpeg.dct_matrix()
    torch.testing.assert_close(d @ d.T, torch.eye(8), atol=1e-6, rtol=0)
    block = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 255 - 128
    coeffs = jpeg.block_dct(block)[0, 0, 0, 0]
    # T.81 A.3.3: F(u,v) = 1/4 C(u) C(v) sum_xy f(x,y) cos((2x+1)u pi/16) cos((2y+1)v pi/16).
    x = torch.arange(8.0)
    c = torch.ones(8)
    c[0] = 2**-0.5
    basis = torch.cos((2 * x[None, :] + 1) * x[:, None] * torch.pi / 16)  # [u, x]
    expected = 0.25 * c[:, None] * c[None, :] * (basis @ block[0, 0] @ basis.T)
    torch.testing.assert_close(coeffs, expected, atol=1e-3, rtol=1e-4)


def test_flat_image_is_cheaper_than_noise():
    flat = torch.full((1, 3, 64, 64), 0.5)
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert jpeg.jpeg_size_surrogate(flat) < jpeg.jpeg_size_surrogate(noise) / 10


def test_odd_sizes_are_padded():
    images = torch.rand(2, 3, 37, 45, generator=torch.Generator().manual_seed(0))
    assert jpeg.jpeg_size_surrogate(images).shape == (2,)


def test_rewards_shape_sign_gradient_and_logged_size():
    quality = 90
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)).requires_grad_()
    setting = {"reward.compressibility.quality": quality}
    compress, _, info = make_reward("compressibility", setting)(images, ["a"] * 3, [{}] * 3)
    incompress, _, _ = make_reward("incompressibility", setting)(images, ["a"] * 3, [{}] * 3)
    info = {k.removeprefix("compressibility/"): v for k, v in info.items()}
    assert compress.shape == (3,) and compress.dtype == torch.float32 and torch.isfinite(compress).all()
    torch.testing.assert_close(compress, -incompress)
    assert (compress < 0).all()
    compress.sum().backward()
    assert images.grad.abs().sum() > 0
    # The logged size is Pillow's, at config.reward.compressibility.quality.
    expected = _pillow_kb(images.detach(), quality)
    np.testing.assert_allclose(info["jpeg_kb"].numpy(), expected, rtol=1e-6)
    assert info["jpeg_kb"].dtype == torch.float32
    # Gradient ascent on compressibility makes the real JPEG smaller.
    step = (images + 0.02 * images.grad.sign()).detach().clamp(0, 1)
    assert _pillow_kb(step, quality).sum() < expected.sum()
