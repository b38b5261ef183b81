"""PatchConv2d computes the patch-embedding convolution (forward and both gradients) of the Conv2d it replaces; the
float8 matmuls compute the product of their quantized operands, only where switched on and without gradients."""

import pytest
import torch
from torch import nn

from alignprop import kernels
from alignprop.kernels import PatchConv2d, use_patch_matmuls


@pytest.mark.parametrize("size,bias", [((28, 28), True), ((30, 33), False), ((14, 14), True)])
def test_patch_conv_equals_conv2d(size, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 7, stride=7, bias=bias).double()
    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    ref = conv(x)
    weighting = torch.randn_like(ref)  # a random functional of the output, for the gradients
    ref_grads = torch.autograd.grad((conv(x) * weighting).sum(), [x, *conv.parameters()])

    assert use_patch_matmuls(wrapper := nn.Sequential(conv)) == 1
    patch = wrapper[0]
    assert isinstance(patch, PatchConv2d) and patch.weight is conv.weight
    out = patch(x)
    grads = torch.autograd.grad((out * weighting).sum(), [x, *patch.parameters()])
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


def test_only_patch_convolutions_are_replaced():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 2, stride=1), nn.Conv2d(4, 4, 2, stride=2, groups=2),
        nn.Conv2d(4, 4, 2, stride=2),
    )
    assert use_patch_matmuls(model) == 1
    assert [type(m).__name__ for m in model] == ["Conv2d", "Conv2d", "Conv2d", "PatchConv2d"]


def test_reward_towers_give_the_same_scores_with_patch_matmuls():
    """The CLIP vision tower (transformers) and open_clip's tower: same outputs, same state dict keys."""
    from alignprop.rewards import towers

    hf = towers.tiny_vision_tower().eval()
    oc = towers.tiny_open_clip().visual.eval()
    for model, size in ((hf, hf.config.image_size), (oc, oc.image_size[0])):
        x = torch.rand(2, 3, size, size)
        keys = list(model.state_dict())
        with torch.no_grad():
            ref = model(x)
            ref = ref.image_embeds if hasattr(ref, "image_embeds") else ref
            assert use_patch_matmuls(model) == 1
            out = model(x)
            out = out.image_embeds if hasattr(out, "image_embeds") else out
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        assert list(model.state_dict()) == keys


def test_fp8_rows_keep_each_value_within_a_sixteenth():
    torch.manual_seed(0)
    x = torch.randn(6, 64) * torch.logspace(-3, 3, 6)[:, None]  # rows six orders of magnitude apart
    x[2] = 0.0
    q, scale = kernels.quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (6, 1)
    back = q.float() * scale
    # e4m3: 3 mantissa bits, so rounding moves a normal value by at most 1/16 of itself; below 2^-6 (e4m3's
    # smallest normal, times the scale) the spacing is fixed at 2^-9 (times the scale)
    assert ((back - x).abs() <= x.abs() / 16 + scale * 2**-10).all()
    assert (back[2] == 0).all() and torch.isfinite(scale).all()
    nonzero = [0, 1, 3, 4, 5]
    torch.testing.assert_close(q.float().abs().amax(1)[nonzero], torch.full((5,), 448.0))  # each row's largest


@pytest.mark.parametrize("bias", [True, False])
def test_fp8_linear_is_the_product_of_the_quantized_operands(bias):
    torch.manual_seed(0)
    x, weight = torch.randn(2, 5, 64), torch.randn(48, 64) / 8
    b = torch.randn(48) if bias else None
    out = kernels.fp8_linear(x, weight, b)
    assert out.shape == (2, 5, 48) and out.dtype == torch.float32
    # the reference, written out: each operand dequantized from its own per-row float8 values, in float64
    qx, sx = kernels.quantize_rows(x.reshape(10, 64))
    qw, sw = kernels.quantize_rows(weight)
    product = (qx.double() * sx.double()) @ (qw.double() * sw.double()).T
    # the product is rounded to bf16 (8 significant bits) on its way out (torch._scaled_mm's row-wise scales give a
    # bf16 result), then the bias added
    torch.testing.assert_close(out.reshape(10, 48).double() - (b.double() if bias else 0), product, rtol=2**-8,
                               atol=1e-6)
    exact = x @ weight.T + (b if bias else 0)
    rel = ((out - exact).norm() / exact.norm()).item()
    assert 1e-4 < rel < 0.05  # an approximation of the exact product, a close one
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernels.fp8_linear(x, weight, b).dtype == torch.bfloat16  # autocast's compute dtype


def test_fp8_matmuls_run_only_when_switched_on_and_without_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 24), nn.Linear(24, 16))
    x = torch.randn(3, 64)
    exact = model(x).detach()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    layers = kernels.use_fp8_matmuls(model)
    assert layers == [model[0]]  # 32 -> 24 and 24 -> 16: not multiples of 16 on both sides, left as they were
    assert kernels.use_fp8_matmuls(model) == layers  # again: the same layers
    assert type(model[2]) is nn.Linear and all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model(x), exact)  # switched off
    with kernels.fp8_matmuls(layers, True):
        assert torch.equal(model(x), exact)  # gradients recorded: exact
        with torch.no_grad():
            fast = model(x)
            with kernels.fp8_matmuls(layers, False):
                assert torch.equal(model(x), exact)  # switched off inside
            assert torch.equal(model(x), fast)  # and on again after
    assert not torch.equal(fast, exact)
    torch.testing.assert_close(fast, exact, rtol=0.05, atol=0.05)
    with torch.no_grad():
        assert torch.equal(model(x), exact)  # off again after the block
