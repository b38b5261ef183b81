"""The SDXL family against independent references: diffusers' StableDiffusionXLPipeline (encoding, the
no-grad rollout, loading our LoRA) and plain autograd through an independently written SDXL DDIM loop."""

import copy
import math

import pytest
import torch

from alignprop import families, lora
from alignprop.rollout import Rollout, SampleSpec, grad_suffix
from alignprop.speed import Prepared
from helpers import SD_TARGETS, fixed_reward, lora_grads, randomize_lora, tiny_components

NUM_STEPS = 6
GUIDANCE = 5.0
PROMPTS = ["a photo of a cat", "an owl on a branch"]


@pytest.fixture(scope="module")
def sdxl():
    return families.get("sdxl")


@pytest.fixture(scope="module")
def base_components(sdxl):
    return tiny_components(sdxl)


@pytest.fixture
def components(base_components):
    """Tiny SDXL components, fresh for each test (a test may add LoRA or checkpointing)."""
    return copy.deepcopy(base_components)


@pytest.fixture
def lora_components(components):
    lora.add_lora(components.denoiser, 4, 4.0, SD_TARGETS)
    randomize_lora(components.denoiser)
    return components


def make_rollout(components, sdxl, *, eta=0.0, rescale=0.0, size=None, **prepared):
    height, width = size or (None, None)
    spec = SampleSpec(NUM_STEPS, GUIDANCE, rescale, eta, height, width)
    return Rollout(sdxl, components, spec, Prepared(components.denoiser, components.vae, **prepared))


def x_T(rollout, batch=2, seed=0):
    return rollout.initial_latents(batch, torch.Generator().manual_seed(seed))


def pipeline_images(pipe, rollout, latents, eta=0.0, rescale=0.0):
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        PROMPTS, height=rollout.height, width=rollout.width, latents=latents.clone(), num_inference_steps=NUM_STEPS,
        guidance_scale=GUIDANCE, guidance_rescale=rescale, eta=eta, generator=torch.Generator().manual_seed(123),
        output_type="pt",
    ).images


def encode_prompt(pipe, prompts):
    """diffusers' (embeds, negative embeds, pooled, negative pooled) of `prompts`, with no negative prompt."""
    return pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=True)


def test_encode_and_negative_are_the_pipelines(components, sdxl):
    """Both encoders' penultimate states concatenated, bigG's pooled projection, zero negatives, time ids."""
    pipe = sdxl.pipeline(components)
    embeds, negative, pooled, negative_pooled = encode_prompt(pipe, PROMPTS)
    size = (32, 48)
    ours = sdxl.encode(components, PROMPTS, size)
    widths = [e.config.hidden_size for e in components.text_encoders]
    projection = components.text_encoders[1].config.projection_dim
    assert embeds.shape == (2, 77, sum(widths)) and pooled.shape == (2, projection)
    torch.testing.assert_close(ours["encoder_hidden_states"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours["added_cond_kwargs"]["text_embeds"], pooled, rtol=0, atol=0)
    time_ids = pipe._get_add_time_ids(size, (0, 0), size, embeds.dtype, projection)
    torch.testing.assert_close(ours["added_cond_kwargs"]["time_ids"], time_ids.expand(2, 6), rtol=0, atol=0)
    neg = sdxl.negative(components, size)
    assert not negative.any() and not negative_pooled.any()  # force_zeros_for_empty_prompt
    torch.testing.assert_close(neg["encoder_hidden_states"].expand_as(negative), negative, rtol=0, atol=0)
    torch.testing.assert_close(neg["added_cond_kwargs"]["text_embeds"].expand_as(negative_pooled), negative_pooled,
                               rtol=0, atol=0)
    torch.testing.assert_close(neg["added_cond_kwargs"]["time_ids"], time_ids, rtol=0, atol=0)
    # A checkpoint without force_zeros_for_empty_prompt: the encoded empty prompt, as the pipeline encodes it
    # (for one prompt: the negative is encoded once, at batch 1, and CPU matmuls round per batch size).
    components.pipeline_config["force_zeros_for_empty_prompt"] = False
    _, negative, _, negative_pooled = encode_prompt(sdxl.pipeline(components), PROMPTS[:1])
    neg = sdxl.negative(components, size)
    assert negative.abs().sum() > 0
    torch.testing.assert_close(neg["encoder_hidden_states"].expand_as(negative), negative, rtol=0, atol=0)
    torch.testing.assert_close(neg["added_cond_kwargs"]["text_embeds"].expand_as(negative_pooled), negative_pooled,
                               rtol=0, atol=0)


@pytest.mark.parametrize("eta,rescale,size", [
    (0.0, 0.0, None), (0.7, 0.0, None), (0.0, 0.0, (32, 48)), (0.7, 0.7, (48, 24)), (0.0, 0.0, (40, 32)),
])
def test_no_grad_rollout_equals_diffusers_pipeline(components, sdxl, eta, rescale, size):
    """Our rollout equals `StableDiffusionXLPipeline` (its scheduler: the same DDIM) on the same x_T, square and
    non-square, deterministic and stochastic DDIM."""
    rollout = make_rollout(components, sdxl, eta=eta, rescale=rescale, size=size)
    latents = x_T(rollout)
    expected = pipeline_images(sdxl.pipeline(components), rollout, latents, eta, rescale)
    with torch.no_grad():
        ours = rollout(rollout.encode(PROMPTS), latents, (), torch.Generator().manual_seed(123))
    assert ours.shape == expected.shape == (2, 3, rollout.height, rollout.width)
    assert ours.std() > 0.01  # images, not a constant
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_latents_mean_and_std_of_the_vae_are_used_as_the_pipeline_uses_them(components, sdxl):
    components.vae.register_to_config(latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 1.0, 2.0])
    rollout = make_rollout(components, sdxl)
    latents = x_T(rollout)
    expected = pipeline_images(sdxl.pipeline(components), rollout, latents)
    with torch.no_grad():
        ours = rollout(rollout.encode(PROMPTS), latents)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_scheduler_is_ddim_from_the_checkpoints_euler_config(components, sdxl):
    from diffusers import DDIMScheduler

    s = components.scheduler
    assert type(s) is DDIMScheduler and s.init_noise_sigma == 1.0
    assert (s.config.beta_schedule, s.config.beta_start, s.config.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert (s.config.clip_sample, s.config.set_alpha_to_one, s.config.steps_offset) == (False, False, 1)
    assert make_rollout(components, sdxl).schedule.timesteps == [166 * i + 1 for i in reversed(range(NUM_STEPS))]


# ---- an independent SDXL DDIM loop (plain autograd): diffusers' prompt encoding, the DDIM equations ----


def reference_images(components, sdxl, latents, size, detach_first):
    """DDIM eta=0 (Song et al. 2021, eq. 12) with CFG on [zeros, prompt] and SDXL's added conditioning;
    denoiser outputs of the first `detach_first` steps detached."""
    unet, vae = components.denoiser, components.vae
    embeds, negative, pooled, negative_pooled = encode_prompt(sdxl.pipeline(components), PROMPTS)
    height, width = size
    added = {"text_embeds": torch.cat([negative_pooled, pooled]),
             "time_ids": torch.tensor([[height, width, 0, 0, height, width]] * 4, dtype=embeds.dtype)}
    alphas = components.scheduler.alphas_cumprod.tolist()
    step = 1000 // NUM_STEPS
    x = latents
    for i, t in enumerate(step * i + 1 for i in reversed(range(NUM_STEPS))):
        out = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([negative, embeds]),
                   added_cond_kwargs=added).sample
        uncond, text = out.chunk(2)
        eps = uncond + GUIDANCE * (text - uncond)
        if i < detach_first:
            eps = eps.detach()
        a_t, a_prev = alphas[t], alphas[t - step] if t - step >= 0 else alphas[0]
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    images = vae.decode(x / vae.config.scaling_factor).sample
    return (images / 2 + 0.5).clamp(0, 1)


SIZE = (32, 48)


def our_grads(components, sdxl, k, checkpoint):
    if checkpoint:  # the SDXL configs' plan: each grad step recomputed, and the UNet's and VAE's blocks inside
        components.denoiser.enable_gradient_checkpointing()
        components.vae.enable_gradient_checkpointing()
    rollout = make_rollout(components, sdxl, size=SIZE, checkpoint_grad_steps=checkpoint,
                           checkpoint_decode=checkpoint, decode_chunk=1 if checkpoint else 0)
    images = rollout(rollout.encode(PROMPTS), x_T(rollout), grad_suffix(NUM_STEPS, k))
    grads = lora_grads(components.denoiser, fixed_reward(images).sum())
    components.denoiser.disable_gradient_checkpointing()
    components.vae.disable_gradient_checkpointing()
    return grads


def reference_grads(components, sdxl, k):
    latents = x_T(make_rollout(components, sdxl, size=SIZE))
    images = reference_images(components, sdxl, latents, SIZE, detach_first=NUM_STEPS - k)
    return lora_grads(components.denoiser, fixed_reward(images).sum())


@pytest.mark.parametrize("k,checkpoint", [(NUM_STEPS, False), (NUM_STEPS, True), (1, False), (1, True), (3, True)])
def test_lora_gradient_equals_plain_autograd(lora_components, sdxl, k, checkpoint):
    ours, ref = our_grads(lora_components, sdxl, k, checkpoint), reference_grads(lora_components, sdxl, k)
    assert ours.keys() == ref.keys() and len(ref) > 0
    assert sum(g.abs().sum() for g in ref.values()) > 0, "reference gradient is zero: the test would prove nothing"
    for name in ref:
        # fp32 through 6 UNet calls and the VAE, the DDIM arithmetic written differently: float32 round-off.
        torch.testing.assert_close(ours[name], ref[name], rtol=2e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    if k == NUM_STEPS:
        assert any("lora_A" in n and g.abs().sum() > 0 for n, g in ours.items())


def test_truncation_changes_the_gradient(lora_components, sdxl):
    """Guard against a reference that ignores K: K=1 and K=T give different gradients."""
    g1, gt = reference_grads(lora_components, sdxl, 1), reference_grads(lora_components, sdxl, NUM_STEPS)
    assert sum((g1[n] - gt[n]).abs().sum() for n in g1) > 1e-3 * sum(g.abs().sum() for g in gt.values())


# ---- our LoRA in diffusers' pipeline ----


def test_trained_lora_loads_into_the_pipeline_and_gives_our_images(components, base_components, sdxl, tmp_path):
    """A LoRA (alpha != rank: the saved metadata sets the scale) written as training writes it loads into a
    fresh StableDiffusionXLPipeline with `load_lora_weights`, and the pipeline's images change to our own."""
    from safetensors import safe_open

    config = lora.add_lora(components.denoiser, 4, 8.0, SD_TARGETS)
    randomize_lora(components.denoiser, seed=1, scale=0.2)
    lora.save_lora(sdxl, components.denoiser, config, str(tmp_path))
    with safe_open(str(tmp_path / lora.LORA_WEIGHTS), "pt") as f:
        assert all(key.startswith("unet.") for key in f.keys()) and "lora_adapter_metadata" in f.metadata()
    fresh = copy.deepcopy(base_components)
    pipe = sdxl.pipeline(fresh)
    rollout = make_rollout(components, sdxl, size=SIZE)
    latents = x_T(rollout)
    base = pipeline_images(pipe, rollout, latents)
    pipe.load_lora_weights(str(tmp_path))
    assert pipe.get_active_adapters(), "no adapter became active: the LoRA silently loaded nothing"
    loaded = pipeline_images(pipe, rollout, latents)
    with torch.no_grad():
        ours = rollout(rollout.encode(PROMPTS), latents)
    assert (loaded - base).abs().max() > 1e-2  # the LoRA does change the pipeline's images...
    torch.testing.assert_close(loaded, ours, atol=1e-6, rtol=1e-5)  # ...to exactly ours
    # And back into a training adapter (resume), bit for bit.
    other = copy.deepcopy(base_components)
    lora.add_lora(other.denoiser, 4, 8.0, SD_TARGETS)
    lora.load_into(other.denoiser, sdxl, str(tmp_path))
    a, b = components.denoiser.state_dict(), other.denoiser.state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)
