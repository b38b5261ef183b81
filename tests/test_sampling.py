"""The differentiable sampler against independent references: diffusers' pipeline and plain autograd."""

import math

import pytest
import torch

from alignprop.sampling import (
    SamplingSpec,
    ddim_rollout,
    ddim_timesteps,
    decode_latents,
    guided_unet,
    sample_images,
)

NUM_STEPS = 6
GUIDANCE = 7.5


def _inputs(components, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    unet = components.unet
    embeds = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    negative = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    latents = torch.randn(batch, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size, generator=g)
    return embeds, negative, latents


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_no_grad_sampler_equals_diffusers_pipeline(components, eta):
    from alignprop.generation import build_pipeline

    pipe = build_pipeline(components)  # diffusers' own StableDiffusionPipeline: the reference
    pipe.set_progress_bar_config(disable=True)
    embeds, negative, latents = _inputs(components)
    expected = pipe(
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        latents=latents.clone(),
        num_inference_steps=NUM_STEPS,
        guidance_scale=GUIDANCE,
        eta=eta,
        generator=torch.Generator().manual_seed(123),
        output_type="pt",
    ).images
    spec = SamplingSpec(num_steps=NUM_STEPS, guidance_scale=GUIDANCE, eta=eta)
    with torch.no_grad():
        ours = sample_images(
            components.unet, components.vae, components.scheduler, embeds, negative, latents, spec, 0,
            torch.Generator().manual_seed(123),
        )
    assert ours.shape == expected.shape
    assert ours.min() >= 0 and ours.max() <= 1
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_timesteps_are_python_ints(components):
    timesteps = ddim_timesteps(components.scheduler, NUM_STEPS)
    assert all(type(t) is int for t in timesteps)
    # SD's "leading" spacing with steps_offset=1: 1000 // 6 = 166 apart, ending at 1.
    assert timesteps == [166 * i + 1 for i in reversed(range(NUM_STEPS))]


# ---- an independent unrolled DDIM loop (plain autograd), written from the DDIM equations ----


def _reference_images(unet, vae, alphas_cumprod, embeds, negative, latents, num_steps, detach_first):
    """DDIM eta=0 (Song et al. 2021, eq. 12) with CFG; UNet outputs of the first `detach_first` steps detached."""
    step = 1000 // num_steps
    timesteps = [step * i + 1 for i in reversed(range(num_steps))]
    x = latents
    for i, t in enumerate(timesteps):
        out = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([negative, embeds])).sample
        uncond, cond = out.chunk(2)
        eps = uncond + GUIDANCE * (cond - uncond)
        if i < detach_first:
            eps = eps.detach()
        a_t = alphas_cumprod[t]
        a_prev = alphas_cumprod[t - step] if t - step >= 0 else alphas_cumprod[0]  # set_alpha_to_one=False
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    images = vae.decode(x / vae.config.scaling_factor).sample
    return (images / 2 + 0.5).clamp(0, 1)


def _reward(images):
    """A fixed differentiable 'reward' (random linear functional of the pixels), independent of reward models."""
    w = torch.randn(images.shape[1:], generator=torch.Generator().manual_seed(7))
    return (images * w).flatten(1).sum(1)


def _lora_grads(unet, loss):
    params = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {n: (torch.zeros_like(p) if g is None else g) for (n, p), g in zip(params.items(), grads)}


def _our_grads(components, grad_steps, checkpoint, **spec_options):
    embeds, negative, latents = _inputs(components)
    spec = SamplingSpec(
        num_steps=NUM_STEPS, guidance_scale=GUIDANCE, eta=0.0, checkpoint_grad_steps=checkpoint, **spec_options
    )
    images = sample_images(
        components.unet, components.vae, components.scheduler, embeds, negative, latents, spec, grad_steps, None
    )
    return _lora_grads(components.unet, _reward(images).sum())


def _reference_grads(components, detach_first):
    embeds, negative, latents = _inputs(components)
    alphas = components.scheduler.alphas_cumprod.tolist()
    images = _reference_images(
        components.unet, components.vae, alphas, embeds, negative, latents, NUM_STEPS, detach_first
    )
    return _lora_grads(components.unet, _reward(images).sum())


def _assert_grads_close(ours, ref):
    assert ours.keys() == ref.keys() and len(ours) > 0
    total = sum(g.abs().sum() for g in ref.values())
    assert total > 0, "reference gradient is zero: the test would prove nothing"
    for name in ref:
        # fp32 through 6 UNet calls and the VAE; summation order differs (batched CFG vs ours is the same,
        # but the DDIM arithmetic is written differently), so allow float32 round-off.
        torch.testing.assert_close(ours[name], ref[name], rtol=2e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("checkpoint", [False, True])
def test_full_backprop_gradient_equals_plain_autograd(lora_components, checkpoint):
    ours = _our_grads(lora_components, NUM_STEPS, checkpoint)
    ref = _reference_grads(lora_components, detach_first=0)
    _assert_grads_close(ours, ref)
    # Both LoRA factors get gradient once lora_B is nonzero.
    assert any("lora_A" in n and g.abs().sum() > 0 for n, g in ours.items())
    assert any("lora_B" in n and g.abs().sum() > 0 for n, g in ours.items())


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("checkpoint", [False, True])
def test_truncated_gradient_equals_autograd_with_detached_prefix(lora_components, k, checkpoint):
    ours = _our_grads(lora_components, k, checkpoint)
    ref = _reference_grads(lora_components, detach_first=NUM_STEPS - k)
    _assert_grads_close(ours, ref)


@pytest.mark.parametrize("uncheckpointed", [1, 3])
def test_uncheckpointed_last_steps_give_the_same_gradient(lora_components, uncheckpointed):
    ours = _our_grads(lora_components, 3, True, uncheckpointed_steps=uncheckpointed)
    ref = _reference_grads(lora_components, detach_first=NUM_STEPS - 3)
    _assert_grads_close(ours, ref)


def test_compiled_unet_and_decoder_give_the_same_gradient(lora_components):
    """torch.compile of the UNet (every call, grad and no-grad) and of the VAE decoder, through the same
    checkpointing as training (whole calls, the uncheckpointed last step, the decoder per image).

    The "aot_eager" backend traces the graphs that inductor would compile (Dynamo capture, AOTAutograd's
    joint forward/backward and partition) without generating kernels, so this runs in seconds on a CPU;
    inductor's own kernels are compared against eager on the GPU by `scripts/benchmark.py --compare-eager`.
    """
    import torch._dynamo

    from alignprop.sampling import is_compiled

    options = dict(uncheckpointed_steps=1, checkpoint_decode=True, decode_batch_size=1)
    ref = _reference_grads(lora_components, detach_first=NUM_STEPS - 3)  # eager: before compiling
    torch._dynamo.reset()
    try:
        lora_components.unet.compile(backend="aot_eager")
        lora_components.vae.decoder.compile(backend="aot_eager")
        assert is_compiled(lora_components.unet)
        ours = _our_grads(lora_components, 3, True, **options)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert graphs >= 3, "the UNet (with and without grad) and the decoder should each have been captured"
    _assert_grads_close(ours, ref)


def test_compiled_blocks_give_the_same_gradient(lora_components):
    """Regional compilation (train.compile_scope="blocks"): each attention and ResNet block compiled on its
    own, the glue eager, same checkpointing as training; gradients equal plain autograd's."""
    import ml_collections
    import torch._dynamo

    from alignprop.models import compile_models
    from alignprop.sampling import is_compiled

    train = ml_collections.ConfigDict(dict(
        compile_unet=True, compile_grad_steps=True, compile_decoder=False, compile_mode="default",
        compile_backend="aot_eager", compile_memory_budget=1.0, compile_scope="blocks",
    ))
    ref = _reference_grads(lora_components, detach_first=NUM_STEPS - 3)  # eager: before compiling
    torch._dynamo.reset()
    try:
        compile_models(lora_components, train)
        assert is_compiled(lora_components.unet) and not is_compiled(lora_components.vae.decoder)
        ours = _our_grads(lora_components, 3, True, uncheckpointed_steps=1)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert graphs >= 2, "the blocks (with and without grad) should have been captured"
    _assert_grads_close(ours, ref)


def test_timestep_tensors_are_made_once():
    from alignprop.sampling import timestep_tensor

    t = timestep_tensor(981, torch.device("cpu"))
    assert t.dtype == torch.int64 and t.ndim == 0 and int(t) == 981
    assert timestep_tensor(981, torch.device("cpu")) is t


def test_truncation_changes_the_gradient(lora_components):
    """Guard against a reference that ignores K: K=1 and K=T give different gradients."""
    g1 = _our_grads(lora_components, 1, False)
    gt = _our_grads(lora_components, NUM_STEPS, False)
    diff = sum((g1[n] - gt[n]).abs().sum() for n in g1)
    assert diff > 1e-3 * sum(g.abs().sum() for g in gt.values())


class _CountingUNet(torch.nn.Module):
    """Wraps a UNet; records for each call whether its output joined the graph and received gradient."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.config = unet.config
        self.calls = []  # per call: {"grad_enabled": bool, "got_grad": bool}

    def forward(self, *args, **kwargs):
        # Recorded before the call: checkpoint recomputation stops early, inside the UNet.
        record = {"grad_enabled": torch.is_grad_enabled(), "got_grad": False}
        self.calls.append(record)
        out = self.unet(*args, **kwargs)
        if out[0].requires_grad:

            def hook(grad):
                record["got_grad"] = True

            out[0].register_hook(hook)
        return out


@pytest.mark.parametrize(
    "k,checkpoint,uncheckpointed", [(1, False, 0), (2, False, 0), (NUM_STEPS, False, 0), (2, True, 0), (3, True, 1)]
)
def test_exactly_the_last_k_unet_calls_receive_gradient(lora_components, k, checkpoint, uncheckpointed):
    counting = _CountingUNet(lora_components.unet)
    embeds, negative, latents = _inputs(lora_components)
    spec = SamplingSpec(
        num_steps=NUM_STEPS, guidance_scale=GUIDANCE, eta=0.0, checkpoint_grad_steps=checkpoint,
        uncheckpointed_steps=uncheckpointed,
    )
    images = sample_images(
        counting, lora_components.vae, lora_components.scheduler, embeds, negative, latents, spec, k, None
    )
    assert len(counting.calls) == NUM_STEPS
    forward_calls = list(counting.calls)
    _reward(images).sum().backward()
    # Checkpointing re-runs the last K calls in backward (recomputation), except the uncheckpointed last ones.
    assert len(counting.calls) == NUM_STEPS + (k - uncheckpointed if checkpoint else 0)
    got = [c["got_grad"] for c in forward_calls]
    enabled = [c["grad_enabled"] for c in forward_calls]
    expected = [i >= NUM_STEPS - k for i in range(NUM_STEPS)]
    assert got == expected
    assert enabled == expected  # steps before the cut build no graph at all


def test_eta_noise_does_not_depend_on_k(components):
    """With eta > 0 every step draws its noise, so the no-grad result is the same whatever K is."""
    embeds, negative, latents = _inputs(components)
    outs = []
    for k in (0, 2):
        timesteps = ddim_timesteps(components.scheduler, NUM_STEPS)
        denoise = guided_unet(components.unet, embeds, negative, GUIDANCE)
        with torch.no_grad():
            outs.append(
                ddim_rollout(denoise, components.scheduler, latents, timesteps, k, eta=1.0,
                             generator=torch.Generator().manual_seed(5))
            )
    torch.testing.assert_close(outs[0], outs[1])


def test_decode_maps_to_unit_range_once(components):
    latents = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        raw = components.vae.decode(latents / components.vae.config.scaling_factor).sample
        images = decode_latents(components.vae, latents)
    torch.testing.assert_close(images, (raw / 2 + 0.5).clamp(0, 1))


def test_progress_bar_over_ddim_steps(components, capsys):
    embeds, negative, latents = _inputs(components)
    spec = SamplingSpec(num_steps=3, guidance_scale=GUIDANCE, eta=0.0, progress=True)
    with torch.no_grad():
        sample_images(components.unet, components.vae, components.scheduler, embeds, negative, latents, spec, 0, None)
    err = capsys.readouterr().err
    assert "DDIM steps" in err and "0/3" in err  # a bar over the 3 steps (leave=False erases the last frame)
