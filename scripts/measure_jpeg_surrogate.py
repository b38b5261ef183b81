"""Measure the JPEG-size surrogate against Pillow's real JPEG size on a holdout of photographs and altered copies.

    PYTHONPATH=. python scripts/measure_jpeg_surrogate.py [--old REV] [--temperatures 0,0.05,0.15]

Prints, for the surrogate of `--old` (a git revision, default main) and the current one at each temperature:
Spearman against the real size, the estimate/real ratio on 2-8 px checkerboards, the fraction of correctly
ordered pairs among images whose real sizes are within 10% of each other, the estimate's own gain over a few
steps of pixel-space descent divided by the real gain, and the time of a forward+backward pass at 512².
The holdout (`holdout()`) is built from scikit-image's bundled photographs (no download).
"""

import argparse
import importlib.util
import io
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import stats

PHOTOS = (
    "astronaut", "brick", "camera", "cat", "cell", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass",
    "gravel", "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket", "text",
)
SIZE = 128


def photo(name, size=SIZE, zoom=1, corner=(0.5, 0.5)):
    """A scikit-image photograph as [3, size, size] in [0, 1]: a square crop (1/zoom of the short side)."""
    import skimage.data

    array = getattr(skimage.data, name)()
    if array.ndim == 2:
        array = np.stack([array] * 3, -1)
    image = torch.from_numpy(np.ascontiguousarray(array[..., :3])).permute(2, 0, 1).float()[None] / 255
    h, w = image.shape[-2:]
    side = min(h, w) // zoom
    top, left = int((h - side) * corner[0]), int((w - side) * corner[1])
    image = image[..., top : top + side, left : left + side]
    return F.interpolate(image, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def pillow_kb(images, quality=95):
    """Real JPEG size (kB) of [B,3,H,W] images in [0, 1], rounded to uint8, written by Pillow."""
    sizes = []
    for image in images:
        buffer = io.BytesIO()
        array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return np.array(sizes)


def _jpeg_roundtrip(image, quality):
    buffer = io.BytesIO()
    Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(
        buffer, format="JPEG", quality=quality)
    return torch.from_numpy(np.array(Image.open(buffer))).permute(2, 0, 1).float() / 255


def _blur(image, sigma):
    radius = max(int(3 * sigma), 1)
    kernel = torch.exp(-(torch.arange(-radius, radius + 1).float() ** 2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).view(1, 1, 1, -1).repeat(3, 1, 1, 1)
    x = F.pad(image[None], (radius,) * 4, mode="reflect")
    return F.conv2d(F.conv2d(x, kernel, groups=3), kernel.transpose(2, 3), groups=3)[0]


def _resized(image, factor):
    small = F.interpolate(image[None], scale_factor=1 / factor, mode="bilinear", antialias=True)
    return F.interpolate(small, size=image.shape[-2:], mode="bilinear", align_corners=False)[0].clamp(0, 1)


def variants(image, generator):
    """15 altered copies: the photo, blurred, sharpened, noisy, resized, JPEG-recompressed, flattened, posterized."""
    noisy = [(image + torch.randn(image.shape, generator=generator) * s / 255).clamp(0, 1) for s in (3, 10, 25)]
    return [
        image, _blur(image, 0.8), _blur(image, 2.0), (2 * image - _blur(image, 1.0)).clamp(0, 1), *noisy,
        _resized(image, 2), _resized(image, 4), _jpeg_roundtrip(image, 30), _jpeg_roundtrip(image, 70),
        0.5 + 0.5 * (image - 0.5), (image * 15).round() / 15, image.flip(-1).transpose(-1, -2), 1 - image,
    ]


def checkerboard(period, low, high, color=None, size=SIZE):
    """A checkerboard of `period`-pixel squares between grey levels `low` and `high` (or tinted by `color`)."""
    i = torch.arange(size)
    board = ((i[:, None] // period + i[None, :] // period) % 2).float()
    image = (low + (high - low) * board)[None].repeat(3, 1, 1)
    if color is not None:
        image = image * torch.tensor(color).view(3, 1, 1)
    return image.clamp(0, 1)


def checkerboards():
    return torch.stack([
        checkerboard(p, lo, hi, color)
        for p in (2, 3, 4, 5, 6, 8) for lo, hi in ((0.4, 0.6), (0.2, 0.8), (0.0, 1.0))
        for color in (None, (1.0, 0.6, 0.3))
    ])


def holdout():
    """(images [N,3,128,128], is_checkerboard [N]): photos x (3 crops x 15 variants, ...) and 36 checkerboards."""
    generator = torch.Generator().manual_seed(0)
    images = []
    for index, name in enumerate(PHOTOS):
        crops = [photo(name)] + [photo(name, zoom=2, corner=((index % 3) / 2, ((index + 1) % 3) / 2))]
        for crop in crops:
            images += variants(crop, generator)
    boards = checkerboards()
    out = torch.cat([torch.stack(images), boards]).clamp(0, 1)
    out = (out * 255).round() / 255  # what the real encoder sees
    return out, torch.arange(len(out)) >= len(out) - len(boards)


def fine_ranking(estimate, real, within=0.1):
    """Fraction of pairs ordered as the real sizes, among pairs whose real sizes differ by less than `within`."""
    i, j = np.triu_indices(len(real), 1)
    close = (np.abs(real[i] - real[j]) < within * np.maximum(real[i], real[j])) & (real[i] != real[j])
    agree = np.sign(estimate[i] - estimate[j])[close] == np.sign(real[i] - real[j])[close]
    return float(np.mean(agree)), int(close.sum())


def descent_overstatement(size_fn, images, steps=5, step=1 / 255):
    """(estimated gain, real gain) in kB, summed over images, of `steps` gradient steps lowering the estimate, each
    scaled to an RMS pixel change of `step` (the real encoder sees the result rounded to uint8)."""
    x = images.clone()
    if not size_fn(x[:1].requires_grad_()).requires_grad:  # the hard coder (temperature 0) has no gradient
        return float("nan"), float("nan")
    for _ in range(steps):
        x.requires_grad_(True)
        grad, = torch.autograd.grad(size_fn(x).sum(), x)
        rms = grad.pow(2).mean((1, 2, 3), keepdim=True).sqrt().clamp(min=1e-12)
        x = (x - step * grad / rms).clamp(0, 1).detach()
    x = (x * 255).round() / 255
    with torch.no_grad():
        estimated = (size_fn(images) - size_fn(x)).sum().item()
    return estimated, float((pillow_kb(images) - pillow_kb(x)).sum())


def speed(size_fn, batch=2, side=512, repeats=2):
    x = torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    if not size_fn(x[:1]).requires_grad:
        return float("nan")
    size_fn(x).sum().backward()
    start = time.perf_counter()
    for _ in range(repeats):
        size_fn(x).sum().backward()
    return (time.perf_counter() - start) / repeats


def load_revision(rev):
    """The compressibility module of git revision `rev`, imported from a temporary file."""
    source = subprocess.run(["git", "show", f"{rev}:alignprop/rewards/compressibility.py"], capture_output=True,
                            text=True, check=True).stdout
    path = tempfile.NamedTemporaryFile("w", suffix=".py", delete=False)
    path.write(source)
    path.close()
    spec = importlib.util.spec_from_file_location(f"compressibility_{rev}", path.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def report(name, size_fn, images, boards, real, descent_images):
    estimate = size_fn(images).numpy()
    rho = stats.spearmanr(estimate, real).correlation
    ratio = estimate / real
    fine, pairs = fine_ranking(estimate, real)
    est_gain, real_gain = descent_overstatement(size_fn, descent_images)
    print(f"{name:>22}: Spearman {rho:.4f} | ratio all {ratio.mean():.3f} +- {ratio.std():.3f}, checkerboards "
          f"{ratio[boards].mean():.3f} ({ratio[boards].min():.2f}-{ratio[boards].max():.2f}) | within-10% pairs "
          f"{fine:.3f} of {pairs} | descent: estimated gain {est_gain:.2f} kB / real {real_gain:.2f} kB = "
          f"{est_gain / real_gain if real_gain else float('nan'):.2f}x | 2x512² fwd+bwd {speed(size_fn):.2f} s",
          flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", default="main")
    parser.add_argument("--temperatures", default="0,0.05,0.1,0.15,0.25")
    args = parser.parse_args(argv)
    from alignprop.rewards import compressibility

    torch.set_num_threads(1)
    images, boards = holdout()
    real = pillow_kb(images)
    descent_images = torch.stack([photo(name) for name in PHOTOS[::3]])
    print(f"holdout: {len(images)} images ({int(boards.sum())} checkerboards), {SIZE}², real size "
          f"{real.min():.1f}-{real.max():.1f} kB at quality 95; descent on {len(descent_images)} photos")
    old = load_revision(args.old)
    report(f"old ({args.old})", lambda x: old.jpeg_size_surrogate(x, 95), images, boards, real, descent_images)
    for t in (float(v) for v in args.temperatures.split(",")):
        fn = lambda x, t=t: compressibility.jpeg_size_surrogate(x, 95, temperature=t)  # noqa: E731
        report(f"Huffman, temperature {t}", fn, images, boards, real, descent_images)


if __name__ == "__main__":
    sys.exit(main())
