"""Merged LoRA forward: each adapted Linear runs with weight W + scale·B·A (Hu et al. 2021).

peft computes LoRA as a side branch (x·Aᵀ·Bᵀ, in fp32 for fp32 adapters), which roughly doubles the
UNet forward time at SD 1.5 size. Folding the adapter into the weight gives the plain UNet's speed, is
differentiable in A and B (the gradient of W_eff is chained into them), and recomputes W_eff from the
current A and B at every access, so checkpoint recomputation of any granularity sees the same weights.
peft keeps owning the adapter (config, state dict, saving): only its forward is switched.
"""

from torch import nn
from torch.nn.utils import parametrize


class _LoRADelta(nn.Module):
    """Parametrization W -> W + scale·B·A; A and B are referenced, not registered (peft owns them)."""

    def __init__(self, lora_A, lora_B, scaling):
        super().__init__()
        self._factors = (lora_A, lora_B)  # a tuple keeps them out of this module's parameters/state dict
        self.scaling = scaling

    def forward(self, weight):
        lora_A, lora_B = self._factors
        delta = (lora_B.weight @ lora_A.weight) * self.scaling
        return weight + delta.to(weight.dtype)


def _lora_layers(unet):
    from peft.tuners.lora import LoraLayer

    for module in unet.modules():
        if isinstance(module, LoraLayer):
            yield module


def merge_lora_forward(unet, adapter="default"):
    """Switch every peft LoRA Linear of `unet` to the merged forward; returns the number of layers switched."""
    count = 0
    for layer in _lora_layers(unet):
        base = layer.base_layer
        if not isinstance(base, nn.Linear):
            raise NotImplementedError(f"merged LoRA forward supports Linear layers, not {type(base).__name__}")
        if layer.use_dora.get(adapter) or not isinstance(layer.lora_dropout[adapter], nn.Identity):
            raise NotImplementedError("merged LoRA forward needs plain LoRA (no DoRA, no dropout)")
        if parametrize.is_parametrized(base, "weight"):
            continue
        delta = _LoRADelta(layer.lora_A[adapter], layer.lora_B[adapter], layer.scaling[adapter])
        parametrize.register_parametrization(base, "weight", delta, unsafe=True)
        layer._disable_adapters = True  # peft's forward now calls base_layer(x) alone
        count += 1
    return count


def unmerge_lora_forward(unet):
    """Back to peft's side-branch forward (the base weights are left exactly as they were)."""
    for layer in _lora_layers(unet):
        if parametrize.is_parametrized(layer.base_layer, "weight"):
            parametrize.remove_parametrizations(layer.base_layer, "weight", leave_parametrized=False)
            layer._disable_adapters = False
