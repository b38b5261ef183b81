"""The FLUX.1 family against independent references: FluxPipeline (packing, image ids, the no-grad rollout in
fp32 and bf16, LoRA loading), plain autograd through an Euler flow loop written from the formulas, and the
published parameter counts; plus mixing, the fused export and generation through the pipeline."""

import json
import math

import numpy as np
import pytest
import torch

from alignprop import families, lora, mixing
from alignprop.families import Source
from alignprop.families.flux import image_ids, pack, unpack
from flow_reference import (CountingDenoiser, assert_grads_close, check_last_k_calls, euler_images, flux_sigmas,
                            make_rollout, x_T)
from helpers import config, fixed_reward, lora_grads, randomize_lora, tiny_components, train_in_process

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS, GUIDANCE = 4, 3.5
PROMPTS = ["a photo of a cat", "an owl on a branch"]


@pytest.fixture
def flux():
    return families.get("flux")


@pytest.fixture
def lora_components(flux):
    c = tiny_components(flux, "dev")
    lora.add_lora(c.denoiser, 4, 8.0, flux.lora_targets)
    randomize_lora(c.denoiser, scale=0.1)
    return c


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_packing_and_image_ids_are_the_pipelines():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 6, 10)
    packed = pack(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 6, 10)) and packed.shape == (2, 15, 64)
    assert torch.equal(unpack(packed, 6, 10), latents)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 48, 80, 8), latents)  # it takes pixel sizes
    ids = image_ids(6, 10, "cpu", torch.bfloat16)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.bfloat16))
    assert ids[7].tolist() == [0, 1, 2]  # token 7 of a 3 x 5 grid: row 1, column 2


@pytest.mark.parametrize("variant,size", [("dev", (32, 32)), ("dev", (64, 32)), ("schnell", (32, 48))])
def test_schedule_is_the_formulas(flux, variant, size):
    c = tiny_components(flux, variant)
    rollout = make_rollout(flux, c, STEPS, GUIDANCE, *size)
    tokens = (size[0] // 4) * (size[1] // 4)  # VAE factor 2, then 2x2 packing
    expected = flux_sigmas(STEPS, tokens, dynamic=variant == "dev")
    torch.testing.assert_close(rollout.schedule.sigmas, torch.tensor(expected, dtype=torch.float32), rtol=0, atol=1e-6)
    if variant == "schnell":
        assert rollout.schedule.timesteps == [1000.0, 750.0, 500.0, 250.0]


@pytest.mark.parametrize("variant,size,dtype,steps", [
    ("dev", (32, 32), torch.float32, STEPS), ("dev", (32, 48), torch.float32, STEPS),
    ("schnell", (48, 32), torch.float32, STEPS), ("dev", (48, 32), torch.bfloat16, 28),
    ("schnell", (32, 32), torch.bfloat16, STEPS),
])
def test_no_grad_rollout_equals_the_pipeline_bit_for_bit(flux, variant, size, dtype, steps):
    """From the prompts: no negative to encode, so the same bits (REFERENCE_MODELS.md §6: in bf16 too, where the
    timestep's cast to the latents' dtype before / 1000 matters at 28 steps, and the latents stored in bf16
    between steps)."""
    c = tiny_components(flux, variant, dtype=dtype)
    rollout = make_rollout(flux, c, steps, GUIDANCE, *size)
    latents = x_T(rollout)
    assert latents.shape == (2, (size[0] // 4) * (size[1] // 4), 64) and latents.dtype == dtype
    pipe = flux.pipeline(c)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(PROMPTS, height=size[0], width=size[1], latents=latents.clone(), num_inference_steps=steps,
                    guidance_scale=GUIDANCE, output_type="pt").images
    with torch.no_grad():
        ours = rollout(rollout.encode(PROMPTS), latents)
    assert ours.shape == (2, 3, *size) and torch.equal(ours, expected)


def test_initial_noise_is_the_pipelines_draw(flux):
    c = tiny_components(flux, "dev")
    rollout = make_rollout(flux, c, STEPS, GUIDANCE, 32, 48)
    latents, _ = flux.pipeline(c).prepare_latents(2, 16, 32, 48, torch.float32, "cpu", torch.Generator().manual_seed(0))
    assert torch.equal(x_T(rollout), latents)


def test_distilled_guidance_changes_dev_and_not_schnell(flux):
    outs = {}
    for variant in ("dev", "schnell"):
        c = tiny_components(flux, variant)
        for guidance in (GUIDANCE, 1.0):
            rollout = make_rollout(flux, c, STEPS, guidance, 32, 32)
            with torch.no_grad():
                outs[variant, guidance] = rollout(rollout.encode(PROMPTS), x_T(rollout))
    assert (outs["dev", GUIDANCE] - outs["dev", 1.0]).abs().max() > 1e-3
    assert torch.equal(outs["schnell", GUIDANCE], outs["schnell", 1.0])


def reference_grads(flux, c, rollout, detach_first, size):
    """LoRA gradients of plain autograd through the Euler loop on packed latents (diffusers' own unpacking and
    image ids), the formulas' sigmas, and the fp32 distilled guidance."""
    from diffusers import FluxPipeline

    cond = rollout.encode(PROMPTS)
    h, w = size[0] // 2, size[1] // 2
    img_ids = FluxPipeline._prepare_latent_image_ids(2, h // 2, w // 2, "cpu", torch.float32)

    def velocity(x, sigma):
        t = torch.full((2,), sigma * 1000, dtype=torch.float32) / 1000
        return c.denoiser(hidden_states=x, timestep=t, guidance=torch.full((2,), GUIDANCE),
                          pooled_projections=cond["pooled_projections"],
                          encoder_hidden_states=cond["encoder_hidden_states"],
                          txt_ids=torch.zeros(cond["encoder_hidden_states"].shape[1], 3), img_ids=img_ids).sample

    sigmas = flux_sigmas(STEPS, (h // 2) * (w // 2))
    images = euler_images(velocity, x_T(rollout), sigmas, c.vae, detach_first,
                          unpack=lambda x: FluxPipeline._unpack_latents(x, *size, 2))
    return lora_grads(c.denoiser, fixed_reward(images).sum())


@pytest.mark.parametrize("k,checkpoint", [(1, True), (3, False), (STEPS, True)])
def test_lora_gradients_equal_plain_autograd(flux, lora_components, k, checkpoint):
    size = (32, 48)
    rollout = make_rollout(flux, lora_components, STEPS, GUIDANCE, *size, checkpoint_grad_steps=checkpoint)
    images = rollout(rollout.encode(PROMPTS), x_T(rollout), range(STEPS - k, STEPS))
    ours = lora_grads(lora_components.denoiser, fixed_reward(images).sum())
    assert_grads_close(ours, reference_grads(flux, lora_components, rollout, STEPS - k, size))
    # Every LoRA tensor (double blocks' both streams, the single block's q/k/v) gets gradient.
    assert all(g.abs().sum() > 0 for g in ours.values())


@pytest.mark.parametrize("k,checkpoint", [(1, False), (2, True), (STEPS, False)])
def test_exactly_the_last_k_transformer_calls_receive_gradient(flux, lora_components, k, checkpoint):
    counting = CountingDenoiser(lora_components.denoiser)
    rollout = make_rollout(flux, lora_components, STEPS, GUIDANCE, 32, 32, denoiser=counting,
                           checkpoint_grad_steps=checkpoint, uncheckpointed_steps=0)
    check_last_k_calls(rollout, counting, rollout.encode(PROMPTS), x_T(rollout), k, checkpoint,
                       lambda images: fixed_reward(images).sum())


def test_saved_lora_loads_into_the_pipeline_and_gives_our_rollout(flux, lora_components, tmp_path):
    lora.save_lora(flux, lora_components.denoiser, lora_components.denoiser.peft_config["default"], str(tmp_path))
    pipe = flux.pipeline(tiny_components(flux, "dev"))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(tmp_path))
    assert pipe.get_active_adapters() == ["default_0"]
    rollout = make_rollout(flux, lora_components, STEPS, GUIDANCE, 32, 48)
    latents = x_T(rollout)
    with torch.no_grad():
        ours = rollout(rollout.encode(PROMPTS), latents)
    theirs = pipe(PROMPTS, height=32, width=48, latents=latents.clone(), num_inference_steps=STEPS,
                  guidance_scale=GUIDANCE, output_type="pt").images
    assert torch.equal(ours, theirs)  # alpha 8 != rank 4: the saved metadata gives the scale


def test_mixing_generation_and_the_fused_export(flux, lora_components, tmp_path):
    from diffusers import FluxPipeline

    lora.save_lora(flux, lora_components.denoiser, lora_components.denoiser.peft_config["default"], str(tmp_path / "a"))
    settings = dict(seed=3, num_steps=2, guidance_scale=GUIDANCE, batch_size=2, height=32, width=32)
    pipe = flux.pipeline(tiny_components(flux, "dev"))
    pipe.set_progress_bar_config(disable=True)
    base = mixing.generate(pipe, PROMPTS, **settings)
    mixing.load_mix(pipe.transformer, flux, [(str(tmp_path / "a"), 0.0)])
    assert np.array_equal(mixing.generate(pipe, PROMPTS, **settings), base)  # weight 0: the base model
    mixing.set_mix(pipe.transformer, ["lora_0"], [0.7])
    mixed = mixing.generate(pipe, PROMPTS, **settings)
    assert mixed.shape == (2, 32, 32, 3) and np.abs(mixed - base).max() > 1e-3
    mixing.export_fused(pipe, flux, str(tmp_path / "fused"))
    fused = FluxPipeline.from_pretrained(str(tmp_path / "fused"))
    fused.set_progress_bar_config(disable=True)
    assert not any("lora" in name for name, _ in fused.transformer.named_parameters())
    np.testing.assert_allclose(mixing.generate(fused, PROMPTS, **settings), mixed, atol=1e-5)


def test_published_architectures_have_their_parameter_counts(flux):
    # On the meta device (REFERENCE_MODELS.md §9): FLUX.1-dev 11.90B (its guidance embedder 10.2M more than
    # schnell's 11.89B); CLIP-L 123.1M (no projection), T5-XXL 4.76B, VAE 83.8M.
    dev, schnell = (flux.load(Source("random", v), device="meta") for v in ("flux-dev", "flux-schnell"))
    assert (count(dev.denoiser), count(schnell.denoiser)) == (11_901_408_320, 11_891_178_560)
    assert [count(m) for m in (*dev.text_encoders, dev.vae)] == [123_060_480, 4_762_310_656, 83_819_683]
    assert (dev.vae.config.scaling_factor, dev.vae.config.shift_factor) == (0.3611, 0.1159)
    assert dev.scheduler.config.use_dynamic_shifting and not schnell.scheduler.config.use_dynamic_shifting
    assert flux.image_size(dev) == (1024, 1024) and flux.size_factor(dev) == 16 and dev.max_sequence_length == 512


def test_config_problems_name_the_keys():
    from alignprop import config as configs

    found = configs.problems(config("config/align_prop.py:tiny_flux", {
        "model.use_t5": False, "sample.guidance_rescale": 0.7, "model.prediction_type": "epsilon"}))
    assert "config.model.use_t5=False: FLUX.1 cannot drop T5 (its only token conditioning); leave it True" in found
    assert any(p.startswith("config.sample.guidance_rescale=0.7: FLUX.1 has no classifier-free") for p in found)
    assert any(p.startswith("config.model.prediction_type='epsilon': FLUX.1 predicts flow velocity") for p in found)
    assert not configs.problems(config("config/align_prop.py:hps_flux"))
    assert not configs.problems(config("config/align_prop.py:pickscore_flux"))


@pytest.mark.slow
def test_tiny_flux_run_trains(tmp_path):
    train_in_process(config("config/align_prop.py:tiny_flux", {"run_name": "flux", "logdir": str(tmp_path)}))
    run = tmp_path / "flux"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 8 and all(r["nonfinite"] == 0 and r["grad_norm"] > 0 for r in records)
    assert all(math.isfinite(r["loss"]) for r in records)
    initial = json.loads((run / "eval_initial.json").read_text())["reward_mean"]
    final = json.loads((run / "eval_final.json").read_text())["reward_mean"]
    assert final > initial  # same prompts, same noise: the trained LoRA scores higher
    pipe = families.get("flux").pipeline(tiny_components(families.get("flux"), "dev"))
    pipe.load_lora_weights(str(run))
    assert pipe.get_active_adapters() == ["default_0"]
