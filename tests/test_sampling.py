"""The rollout against independent references: diffusers' own pipeline, and plain autograd through an
independently written DDIM loop (epsilon and v-prediction, guidance rescale)."""

import math

import pytest
import torch

from alignprop.rollout import Rollout, SampleSpec, grad_suffix
from alignprop.speed import Prepared
from helpers import fixed_reward, lora_grads, randomize_lora, tiny_components

NUM_STEPS = 6
GUIDANCE = 7.5
PROMPTS = ["a photo of a cat", "an owl on a branch"]


def make_rollout(components, sd, *, num_steps=NUM_STEPS, eta=0.0, rescale=0.0, height=None, width=None,
                 denoiser=None, **prepared):
    """A Rollout without the speed layer's preparation (plain modules; checkpointing as given)."""
    spec = SampleSpec(num_steps, GUIDANCE, rescale, eta, height, width)
    denoiser = denoiser if denoiser is not None else components.denoiser
    return Rollout(sd, components, spec, Prepared(denoiser, components.vae, **prepared), denoiser)


def x_T(rollout, batch=2, seed=0):
    return rollout.initial_latents(batch, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant,eta,rescale,size", [
    ("sd1", 0.0, 0.0, None), ("sd1", 0.7, 0.0, None), ("sd1", 0.0, 0.0, (32, 48)),
    ("sd2", 0.0, 0.0, None), ("sd2", 0.7, 0.7, (48, 32)), ("sd2-base", 0.0, 0.7, None),
])
def test_no_grad_rollout_equals_diffusers_pipeline(sd, variant, eta, rescale, size):
    """Our rollout (prompts encoded by the family, the empty-prompt negative, DDIM from the checkpoint's
    config with its prediction type, CFG and rescale) equals `StableDiffusionPipeline` on the same x_T."""
    components = tiny_components(sd, variant)
    height, width = size or (None, None)
    rollout = make_rollout(components, sd, eta=eta, rescale=rescale, height=height, width=width)
    latents = x_T(rollout)
    pipe = sd.pipeline(components)  # diffusers' own pipeline: the reference
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        PROMPTS, height=rollout.height, width=rollout.width, latents=latents.clone(), num_inference_steps=NUM_STEPS,
        guidance_scale=GUIDANCE, guidance_rescale=rescale, eta=eta, generator=torch.Generator().manual_seed(123),
        output_type="pt",
    ).images
    with torch.no_grad():
        ours = rollout(rollout.encode(PROMPTS), latents, (), torch.Generator().manual_seed(123))
    assert ours.shape == expected.shape == (2, 3, rollout.height, rollout.width)
    assert ours.min() >= 0 and ours.max() <= 1
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_v_prediction_and_rescale_change_the_images(sd):
    """Guard against a reference that ignores the prediction type or the rescale: each changes the output."""
    outs = {}
    for variant, rescale in (("sd2", 0.0), ("sd2", 0.7), ("sd2-base", 0.0)):
        components = tiny_components(sd, variant)
        rollout = make_rollout(components, sd, rescale=rescale)
        with torch.no_grad():
            outs[variant, rescale] = rollout(rollout.encode(PROMPTS), x_T(rollout))
    assert not torch.allclose(outs["sd2", 0.0], outs["sd2", 0.7], atol=1e-4)
    assert not torch.allclose(outs["sd2", 0.0], outs["sd2-base", 0.0], atol=1e-4)


def test_timesteps(components, sd):
    rollout = make_rollout(components, sd)
    schedule = rollout.schedule
    assert all(type(t) is int for t in schedule.timesteps)
    # SD's "leading" spacing with steps_offset=1: 1000 // 6 = 166 apart, ending at 1.
    assert schedule.timesteps == [166 * i + 1 for i in reversed(range(NUM_STEPS))]
    # The denoiser's: 0-d int64 tensors made once (no host-device copy per call, no recompilation per step).
    assert [int(t) for t in schedule.model_timesteps] == schedule.timesteps
    assert all(t.dtype == torch.int64 and t.ndim == 0 for t in schedule.model_timesteps)


# ---- an independent unrolled DDIM loop (plain autograd), written from the DDIM equations ----


def reference_images(components, cond, negative, latents, detach_first, prediction="epsilon", rescale=0.0):
    """DDIM eta=0 (Song et al. 2021, eq. 12) with CFG (and guidance rescale, Lin et al. 2023 eq. 15-16);
    denoiser outputs of the first `detach_first` steps detached."""
    unet, vae = components.denoiser, components.vae
    alphas = components.scheduler.alphas_cumprod.tolist()
    step = 1000 // NUM_STEPS
    timesteps = [step * i + 1 for i in reversed(range(NUM_STEPS))]
    x = latents
    for i, t in enumerate(timesteps):
        out = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([negative, cond])).sample
        uncond, text = out.chunk(2)
        pred = uncond + GUIDANCE * (text - uncond)
        if rescale:
            std = lambda v: v.flatten(1).std(1).view(-1, 1, 1, 1)  # noqa: E731
            pred = rescale * pred * std(text) / std(pred) + (1 - rescale) * pred
        if i < detach_first:
            pred = pred.detach()
        a_t = alphas[t]
        a_prev = alphas[t - step] if t - step >= 0 else alphas[0]  # set_alpha_to_one=False
        if prediction == "epsilon":
            eps = pred
            x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        else:  # v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022)
            x0 = math.sqrt(a_t) * x - math.sqrt(1 - a_t) * pred
            eps = math.sqrt(a_t) * pred + math.sqrt(1 - a_t) * x
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    images = vae.decode(x / vae.config.scaling_factor).sample
    return (images / 2 + 0.5).clamp(0, 1)


def our_grads(components, sd, k, checkpoint, rescale=0.0, **prepared):
    rollout = make_rollout(components, sd, rescale=rescale, checkpoint_grad_steps=checkpoint, **prepared)
    images = rollout(rollout.encode(PROMPTS), x_T(rollout), grad_suffix(NUM_STEPS, k))
    return lora_grads(components.denoiser, fixed_reward(images).sum())


def reference_grads(components, sd, detach_first, prediction="epsilon", rescale=0.0):
    rollout = make_rollout(components, sd)  # for the same conditioning and x_T only
    cond = rollout.encode(PROMPTS)["encoder_hidden_states"]
    negative = rollout.negative["encoder_hidden_states"].expand_as(cond)
    images = reference_images(components, cond, negative, x_T(rollout), detach_first, prediction, rescale)
    return lora_grads(components.denoiser, fixed_reward(images).sum())


def assert_grads_close(ours, ref, atol_of_max=0.0):
    assert ours.keys() == ref.keys() and len(ours) > 0
    total = sum(g.abs().sum() for g in ref.values())
    assert total > 0, "reference gradient is zero: the test would prove nothing"
    for name in ref:
        # fp32 through 6 UNet calls and the VAE; the DDIM arithmetic is written differently, so allow
        # float32 round-off (and, with `atol_of_max`, an absolute error of that fraction of the tensor's
        # largest entry, for entries near zero).
        atol = max(1e-6, atol_of_max * ref[name].abs().max().item())
        torch.testing.assert_close(ours[name], ref[name], rtol=2e-4, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("checkpoint", [False, True])
def test_full_backprop_gradient_equals_plain_autograd(lora_components, sd, checkpoint):
    ours = our_grads(lora_components, sd, NUM_STEPS, checkpoint)
    assert_grads_close(ours, reference_grads(lora_components, sd, detach_first=0))
    # Both LoRA factors get gradient once lora_B is nonzero.
    assert any("lora_A" in n and g.abs().sum() > 0 for n, g in ours.items())
    assert any("lora_B" in n and g.abs().sum() > 0 for n, g in ours.items())


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("checkpoint", [False, True])
def test_truncated_gradient_equals_autograd_with_detached_prefix(lora_components, sd, k, checkpoint):
    ours = our_grads(lora_components, sd, k, checkpoint)
    assert_grads_close(ours, reference_grads(lora_components, sd, detach_first=NUM_STEPS - k))


@pytest.mark.parametrize("uncheckpointed", [1, 3])
def test_uncheckpointed_last_steps_give_the_same_gradient(lora_components, sd, uncheckpointed):
    ours = our_grads(lora_components, sd, 3, True, uncheckpointed_steps=uncheckpointed)
    assert_grads_close(ours, reference_grads(lora_components, sd, detach_first=NUM_STEPS - 3))


@pytest.mark.parametrize("variant,prediction,rescale", [("sd2", "v_prediction", 0.7), ("sd2", "v_prediction", 0.0),
                                                        ("sd2-base", "epsilon", 0.7)])
def test_sd2_gradient_equals_plain_autograd(sd, variant, prediction, rescale):
    """SD 2.x-shaped models: v-prediction (and epsilon), with and without guidance rescale, K = 3."""
    from alignprop.lora import add_lora

    components = tiny_components(sd, variant)
    assert components.scheduler.config.prediction_type == prediction
    add_lora(components.denoiser, 4, 4.0, sd.lora_targets)
    randomize_lora(components.denoiser)
    ours = our_grads(components, sd, 3, True, rescale=rescale, uncheckpointed_steps=1)
    ref = reference_grads(components, sd, NUM_STEPS - 3, prediction, rescale)
    # The v-to-(x0, eps) conversion and the rescale's std ratio are computed in another order here than in
    # diffusers (measured: 6e-6 to 8e-6 relative difference of the whole gradient, at most 4e-5 of a
    # tensor's largest entry), so entries near zero get an absolute tolerance of 1e-4 of the largest entry.
    assert_grads_close(ours, ref, atol_of_max=1e-4)


def test_truncation_changes_the_gradient(lora_components, sd):
    """Guard against a reference that ignores K: K=1 and K=T give different gradients."""
    g1 = our_grads(lora_components, sd, 1, False)
    gt = our_grads(lora_components, sd, NUM_STEPS, False)
    diff = sum((g1[n] - gt[n]).abs().sum() for n in g1)
    assert diff > 1e-3 * sum(g.abs().sum() for g in gt.values())


class CountingUNet(torch.nn.Module):
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
def test_exactly_the_last_k_denoiser_calls_receive_gradient(lora_components, sd, k, checkpoint, uncheckpointed):
    counting = CountingUNet(lora_components.denoiser)
    rollout = make_rollout(lora_components, sd, denoiser=counting, checkpoint_grad_steps=checkpoint,
                           uncheckpointed_steps=uncheckpointed)
    images = rollout(rollout.encode(PROMPTS), x_T(rollout), grad_suffix(NUM_STEPS, k))
    assert len(counting.calls) == NUM_STEPS
    forward_calls = list(counting.calls)
    fixed_reward(images).sum().backward()
    # Checkpointing re-runs the last K calls in backward (recomputation), except the uncheckpointed last ones.
    assert len(counting.calls) == NUM_STEPS + (k - uncheckpointed if checkpoint else 0)
    expected = [i >= NUM_STEPS - k for i in range(NUM_STEPS)]
    assert [c["got_grad"] for c in forward_calls] == expected
    assert [c["grad_enabled"] for c in forward_calls] == expected  # steps before the cut build no graph at all


def test_eta_noise_does_not_depend_on_k(components, sd):
    """With eta > 0 every step draws its noise, so the result is the same whatever K is."""
    rollout = make_rollout(components, sd, eta=1.0)
    cond, latents = rollout.encode(PROMPTS), x_T(rollout)
    outs = [rollout(cond, latents, grad_suffix(NUM_STEPS, k), torch.Generator().manual_seed(5)).detach()
            for k in (0, 2)]
    torch.testing.assert_close(outs[0], outs[1])


def test_decode_maps_to_unit_range_once(components, sd):
    rollout = make_rollout(components, sd, num_steps=1)
    latents = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        raw = components.vae.decode(latents / components.vae.config.scaling_factor).sample
        images = (rollout.prepared.decode(sd.vae_input(components, latents)) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images, (raw / 2 + 0.5).clamp(0, 1))


def test_progress_bar_over_the_steps(components, sd, capsys):
    rollout = make_rollout(components, sd, num_steps=3)
    rollout.progress = True
    with torch.no_grad():
        rollout(rollout.encode(PROMPTS), x_T(rollout))
    err = capsys.readouterr().err
    assert "denoising steps" in err and "0/3" in err  # a bar over the 3 steps (leave=False erases the last frame)
