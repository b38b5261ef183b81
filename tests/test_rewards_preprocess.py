"""The differentiable preprocessing against the official PIL pipelines, on photographs, square and non-square."""

import pytest
import torch

import reference_preprocess as ref
from alignprop.rewards import preprocess
from alignprop.rewards.object_count import owlv2_preprocess

SHAPES = [(512, 512), (512, 701), (701, 512), (512, 768), (512, 703)]
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket"]
STD = torch.tensor(ref.OPENAI_STD).view(1, 3, 1, 1)


def _pixel_error(ours, official):
    """(mean, max) |difference| in uint8 steps of the [0, 1] image (normalized inputs scaled back by std)."""
    assert ours.shape == official.shape
    error = (ours - official).abs() * STD * 255
    return error.mean().item(), error.max().item()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode, crop, official", [
    ("shortest", "floor", ref.transformers_clip),
    ("shortest", "round", ref.torchvision_clip),
    ("letterbox", "floor", ref.hpsv2),
    ("squash", "floor", ref.owlvit),
])
def test_matches_the_official_pil_pipeline_to_uint8_rounding(shape, mode, crop, official):
    """PIL resamples in uint8 (each pass rounded and clipped); ours in float: within one uint8 step.

    Measured: max 1.02, mean 0.23-0.30 steps over these photos and shapes. Before (bilinear, long side
    rounded, crop for HPSv2): mean 0.008-0.072 of the normalized input for the CLIP crop, 0.37-1.19 for
    HPSv2 at 512x701 and 512x768.
    """
    for name in PHOTOS:
        array = ref.photo(name, *shape)
        ours = preprocess.clip_preprocess(ref.as_tensor(array), 224, mode=mode, crop=crop)
        mean, worst = _pixel_error(ours, official(array, 224))
        assert worst <= 1.1 and mean < 0.35, (name, mean, worst)


def test_owlv2_matches_its_processor():
    for shape in SHAPES[:3]:
        array = ref.photo("astronaut", *shape)
        ours = owlv2_preprocess(ref.as_tensor(array), 224, ref.OPENAI_MEAN, ref.OPENAI_STD)
        mean, worst = _pixel_error(ours, ref.owlv2(array, 224))
        assert worst < 0.01, (shape, mean, worst)  # float on both sides: measured max 1.5e-4 steps


def test_sizes_and_offsets_are_rounded_as_the_references():
    assert preprocess.shortest_side_size(512, 701, 224) == (224, 306)  # int(306.25), not round -> 307
    assert preprocess.shortest_side_size(701, 512, 224) == (306, 224)
    # 512x703 -> 224x307: 83 columns to drop; transformers keeps 41 on the left, torchvision round(41.5) = 42.
    columns = torch.arange(307.0).view(1, 1, 1, -1).expand(1, 1, 224, -1)
    assert preprocess.center_crop(columns, 224, "floor")[0, 0, 0, 0] == 41
    assert preprocess.center_crop(columns, 224, "round")[0, 0, 0, 0] == 42
    # Letterbox of 512x768: 149x224 image, 75 rows of padding (37 above, 38 below), black before normalizing.
    out = preprocess.letterbox(torch.full((1, 3, 512, 768), 0.5), 224)
    assert out.shape == (1, 3, 224, 224)
    rows = out[0, 0, :, 100]
    assert (rows[:37] == 0).all() and (rows[37 + 149 :] == 0).all() and torch.allclose(rows[37 : 37 + 149],
                                                                                         torch.tensor(0.5))


@pytest.mark.parametrize("mode", ["shortest", "letterbox", "squash"])
def test_every_input_pixel_gets_a_gradient(mode):
    image = ref.as_tensor(ref.photo("coffee", 96, 131)).requires_grad_()
    preprocess.clip_preprocess(image, 32, mode=mode, crop="floor").square().sum().backward()
    if mode == "shortest":  # the crop drops columns: only the kept ones and their neighbours
        grad = image.grad[..., :, 20:110]
    else:
        grad = image.grad
    assert (grad != 0).float().mean() > 0.999


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["shortest", "letterbox", "squash"])
def test_half_types_on_the_cpu(dtype, mode):
    """F.interpolate(antialias=True) has no CPU kernel for half types: computed in fp32 and cast back."""
    image = ref.as_tensor(ref.photo("chelsea", 64, 90))
    expected = preprocess.clip_preprocess(image, 32, mode=mode)
    half = image.to(dtype).requires_grad_()
    out = preprocess.clip_preprocess(half, 32, mode=mode)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)  # bf16 has 8 bits of mantissa
    out.float().sum().backward()
    assert half.grad.dtype == dtype and half.grad.abs().sum() > 0
