"""PatchConv2d computes the patch-embedding convolution (forward and both gradients) of the Conv2d it replaces."""

import pytest
import torch
from torch import nn

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
