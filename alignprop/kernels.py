"""Drop-in layers that compute the same function as a torch layer with faster kernels.

The patch embedding of a ViT is a Conv2d whose kernel equals its stride (CLIP ViT-L/14: 3 -> 1024
channels, 14x14 kernel, stride 14). cuDNN has no good backward-data kernel for that shape: on an H100
the gradient with respect to the image took 242 ms for a batch of 4 (BENCHMARKS.md), more than the
rest of the reward model. The same convolution is a reshape into non-overlapping patches and one
matrix product, whose backward is two matrix products.
"""

from torch import nn
from torch.nn import functional as F


class PatchConv2d(nn.Conv2d):
    """A Conv2d with kernel == stride, no padding, dilation or groups, computed as patches @ weightᵀ.

    Same parameters and state dict as the Conv2d it replaces; the output has the Conv2d's shape
    (batch, out_channels, H // k, W // k), in channels-last strides.
    """

    def forward(self, x):
        kh, kw = self.kernel_size
        b, c, h, w = x.shape
        gh, gw = h // kh, w // kw
        x = x[:, :, : gh * kh, : gw * kw]  # a strided conv ignores the remainder rows/columns
        patches = x.reshape(b, c, gh, kh, gw, kw).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * kh * kw)
        out = F.linear(patches, self.weight.reshape(self.out_channels, -1), self.bias)
        return out.reshape(b, gh, gw, self.out_channels).permute(0, 3, 1, 2)


def is_patch_conv(module):
    return (
        type(module) is nn.Conv2d
        and module.kernel_size == module.stride
        and module.padding in ((0, 0), "valid")
        and module.dilation == (1, 1)
        and module.groups == 1
        and module.padding_mode == "zeros"
    )


def use_patch_matmuls(model):
    """Replace every patch-embedding Conv2d of `model` by a PatchConv2d sharing its parameters; returns the count."""
    targets = [(name, m) for name, m in model.named_modules() if is_patch_conv(m)]
    for name, conv in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        patch = PatchConv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, bias=conv.bias is not None,
            device="meta",
        )
        patch.weight, patch.bias = conv.weight, conv.bias
        patch.train(conv.training)
        setattr(parent, child, patch)
    return len(targets)
