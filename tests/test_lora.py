"""Speed options compute the same numbers: merged LoRA, block/nested checkpointing, chunked decoding."""

import pytest
import torch

from alignprop.lora import merge_lora_forward, unmerge_lora_forward
from alignprop.sampling import SamplingSpec, decode_latents, sample_images
from test_sampling import GUIDANCE, _inputs, _lora_grads, _reward

STEPS = 4


def _grads(components, k, **spec_kwargs):
    embeds, negative, latents = _inputs(components)
    spec = SamplingSpec(num_steps=STEPS, guidance_scale=GUIDANCE, eta=0.0, **spec_kwargs)
    images = sample_images(
        components.unet, components.vae, components.scheduler, embeds, negative, latents, spec, k, None
    )
    return images.detach(), _lora_grads(components.unet, _reward(images).sum())


def _assert_same(a, b, rtol=1e-4, atol=1e-6):
    (images_a, grads_a), (images_b, grads_b) = a, b
    torch.testing.assert_close(images_a, images_b, rtol=rtol, atol=atol)
    assert grads_a.keys() == grads_b.keys()
    assert sum(g.abs().sum() for g in grads_a.values()) > 0
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("k", [1, STEPS])
def test_merged_lora_equals_peft_forward(lora_components, k):
    reference = _grads(lora_components, k, checkpoint_grad_steps=False)
    assert merge_lora_forward(lora_components.unet) > 0
    _assert_same(_grads(lora_components, k, checkpoint_grad_steps=False), reference)
    _assert_same(_grads(lora_components, k, checkpoint_grad_steps=True), reference)


def test_merged_lora_keeps_peft_state_and_unmerges_exactly(lora_components):
    from peft.utils import get_peft_model_state_dict

    unet = lora_components.unet
    before = {n: p.clone() for n, p in unet.state_dict().items()}
    keys = set(get_peft_model_state_dict(unet))
    merge_lora_forward(unet)
    assert set(get_peft_model_state_dict(unet)) == keys  # saving is unaffected
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    unmerge_lora_forward(unet)
    after = unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("merged", [False, True])
def test_block_checkpointing_alone_and_nested(lora_components, merged):
    reference = _grads(lora_components, 2, checkpoint_grad_steps=False)
    if merged:
        merge_lora_forward(lora_components.unet)
    lora_components.unet.enable_gradient_checkpointing()
    _assert_same(_grads(lora_components, 2, checkpoint_grad_steps=False), reference)
    _assert_same(_grads(lora_components, 2, checkpoint_grad_steps=True), reference)  # nested in whole-UNet


@pytest.mark.parametrize("batch_size,checkpoint", [(1, False), (1, True), (2, True)])
def test_chunked_checkpointed_decode(components, batch_size, checkpoint):
    latents = torch.randn(3, 4, 16, 16, requires_grad=True)
    plain = decode_latents(components.vae, latents)
    (grad_plain,) = torch.autograd.grad(_reward(plain).sum(), latents)
    ours = decode_latents(components.vae, latents, batch_size, checkpoint)
    (grad_ours,) = torch.autograd.grad(_reward(ours).sum(), latents)
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-6)
    # Convolutions at batch 1 vs 3 pick different kernels/summation orders: float32 round-off, relative
    # to the gradient's scale (max |grad| ~ 1e-2 here), not to each element.
    torch.testing.assert_close(grad_ours, grad_plain, rtol=1e-4, atol=1e-5 * grad_plain.abs().max().item())
