"""Drop-in layers that compute the same function as a torch or peft layer with faster kernels.

- **Patch embeddings as matrix products.** The patch embedding of a ViT is a Conv2d whose kernel equals its
  stride (CLIP ViT-L/14: 3 -> 1024 channels, 14x14 kernel, stride 14). cuDNN has no good backward-data
  kernel for that shape: on an H100 the gradient with respect to the image took 242 ms for a batch of 4
  (BENCHMARKS.md), more than the rest of the reward model. The same convolution is a reshape into
  non-overlapping patches and one matrix product, whose backward is two matrix products.
- **Merged LoRA forward.** peft computes LoRA as a side branch (x·Aᵀ·Bᵀ, in fp32 for fp32 adapters),
  which roughly doubles the UNet forward time at SD 1.5 size. Folding the adapter into the weight,
  W + scale·B·A (Hu et al. 2021), gives the plain model's speed, is differentiable in A and B, and is
  recomputed from the current A and B at every access, so checkpoint recomputation of any granularity
  sees the same weights. peft keeps owning the adapter (config, state dict, saving): only its forward
  is switched, by giving each merged layer one shared subclass of its peft class (not a parametrization:
  torch's parametrize makes a new class per layer, and torch.compile guards on the class, so every block
  would get a graph of its own).
- **float8 matmuls for the steps without gradients** (opt-in, `config.speed.fp8_prefix`). A training rollout's
  no-grad prefix (49 of 50 denoiser calls at K=1) is sampling, not differentiated: its Linear layers can run with
  both operands in float8 e4m3 (per-token and per-output-channel scales, fp32 accumulation: `torch._scaled_mm`,
  twice the bf16 matmul rate on Hopper). The images then differ slightly; the grad steps, evaluation and the KL
  penalty's reference stay exact.
"""

import contextlib

import torch
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


def _merged_forward(self, x, *args, **kwargs):
    """x·(W + scale·B·A)ᵀ + b: the merged forward of a peft LoRA Linear (adapter `self.merged_forward_adapter`)."""
    base = self.base_layer
    weight = base.weight
    if self.merged_forward_on:
        adapter = self.merged_forward_adapter
        delta = (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]
        weight = weight + delta.to(weight.dtype)
    return _linear(self, x, weight, base.bias)


def _linear(layer, x, weight, bias):
    """x·Wᵀ + b, in float8 while `layer.fp8_on` and no gradient is recorded (the merged and the plain Linear's)."""
    if layer.fp8_on and not torch.is_grad_enabled():
        return fp8_linear(x, weight, bias)
    return F.linear(x, weight, bias)


_MERGED_CLASSES = {}


def _merged_class(cls):
    """The one subclass of peft layer class `cls` whose forward is the merged one (made once, shared by all)."""
    if cls not in _MERGED_CLASSES:
        _MERGED_CLASSES[cls] = type(f"Merged{cls.__name__}", (cls,), {"forward": _merged_forward})
    return _MERGED_CLASSES[cls]


def is_merged(layer):
    return type(layer) in _MERGED_CLASSES.values()


def lora_layers(model):
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            yield module


def merge_lora_forward(model, adapter="default"):
    """Switch every peft LoRA Linear of `model` (adapter `adapter`) to the merged forward; returns the count."""
    count = 0
    for layer in lora_layers(model):
        if adapter not in layer.lora_A or is_merged(layer):
            continue
        if type(layer.base_layer) is not nn.Linear:
            raise NotImplementedError(
                f"merged LoRA forward supports Linear layers, not {type(layer.base_layer).__name__}")
        if layer.use_dora.get(adapter) or not isinstance(layer.lora_dropout[adapter], nn.Identity):
            raise NotImplementedError("merged LoRA forward needs plain LoRA (no DoRA, no dropout)")
        layer.__class__ = _merged_class(type(layer))
        layer.merged_forward_adapter, layer.merged_forward_on, layer.fp8_on = adapter, True, False
        count += 1
    return count


@contextlib.contextmanager
def lora_disabled(model):
    """The base model inside the block: every LoRA of `model` (merged or peft's) switched off, then back on.
    No second copy of the weights: the frozen weights are the base model's."""
    all_layers = list(lora_layers(model))
    merged = [layer for layer in all_layers if is_merged(layer)]
    layers = [layer for layer in all_layers if not is_merged(layer)]
    states = [layer._disable_adapters for layer in layers]
    for layer in merged:
        layer.merged_forward_on = False
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer in merged:
            layer.merged_forward_on = True
        for layer, state in zip(layers, states):
            layer._disable_adapters = state


def unmerge_lora_forward(model):
    """Back to peft's side-branch forward (the base weights are left exactly as they were)."""
    for layer in lora_layers(model):
        if is_merged(layer):
            layer.__class__ = type(layer).__bases__[0]
            del layer.merged_forward_adapter, layer.merged_forward_on, layer.fp8_on


FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
FP8_MULTIPLE = 16  # torch._scaled_mm on CUDA needs both matrix dimensions of the weight in multiples of 16


def quantize_rows(x):
    """`x` [M, K] in float8 e4m3 with one float32 scale per row, the row's largest magnitude mapped to 448:
    (q [M, K], scale [M, 1]) with x ~ q * scale (3 mantissa bits: within 1/16 of each value, relatively)."""
    scale = x.detach().abs().amax(dim=-1, keepdim=True).float().clamp(min=torch.finfo(torch.float32).tiny) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_linear(x, weight, bias=None):
    """x·Wᵀ + b with x (per token) and W (per output channel) in float8 e4m3, accumulated in fp32, the result in
    the compute dtype (autocast's, else x's)."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    qx, sx = quantize_rows(x.reshape(-1, x.shape[-1]))
    qw, sw = quantize_rows(weight)
    # Row-wise scales need a bf16 result (torch._scaled_mm on CUDA); the second operand column-major, as qw.t() is.
    out = torch._scaled_mm(qx, qw.t(), scale_a=sx, scale_b=sw.t(), out_dtype=torch.bfloat16).to(dtype)
    if bias is not None:
        out = out + bias.to(dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


class Fp8Linear(nn.Linear):
    """An nn.Linear whose forward runs `fp8_linear` while `fp8_on` and no gradient is recorded (same parameters)."""

    def forward(self, x):
        return _linear(self, x, self.weight, self.bias)


def fp8_capable(in_features, out_features):
    return in_features % FP8_MULTIPLE == 0 and out_features % FP8_MULTIPLE == 0


def use_fp8_matmuls(model):
    """Let every Linear of `model` (plain, or a merged LoRA Linear) run float8 matmuls when switched on by
    `fp8_matmuls`; returns those layers. Layers of other sizes, and the base layers inside LoRA layers (the merged
    forward reads their weights), are left as they are."""
    lora = list(lora_layers(model))
    bases = {id(layer.base_layer) for layer in lora}
    out = [layer for layer in lora if is_merged(layer) and fp8_capable(layer.in_features, layer.out_features)]
    for module in model.modules():
        if type(module) in (nn.Linear, Fp8Linear) and id(module) not in bases and fp8_capable(module.in_features,
                                                                                              module.out_features):
            module.__class__ = Fp8Linear  # (a second call finds the same layers)
            out.append(module)
    for layer in out:
        layer.fp8_on = False
    return out


@contextlib.contextmanager
def fp8_matmuls(layers, on):
    """Inside, `layers` (from `use_fp8_matmuls`) run float8 matmuls in their no-grad calls if `on`, exact ones if
    not; then back to what they did before."""
    before = [layer.fp8_on for layer in layers]
    for layer in layers:
        layer.fp8_on = on
    try:
        yield
    finally:
        for layer, state in zip(layers, before):
            layer.fp8_on = state
