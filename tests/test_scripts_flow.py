"""The scripts with the flow-matching families: the naive baseline (diffusers' pipeline loop with gradients)
computes the same LoRA gradients as our rollout; both benchmark scripts, generation and the soup evaluation run
with SD3 and FLUX (slow tier, subprocesses)."""

import importlib.util
import json
import os

import pytest
import torch

from alignprop import families, lora
from flow_reference import assert_grads_close, make_rollout, x_T
from helpers import REPO, fixed_reward, lora_grads, randomize_lora, run_script, tiny_components

PROMPTS = ["a photo of a cat", "an owl on a branch"]
STEPS = 3


def naive_module():
    path = os.path.join(REPO, "scripts", "benchmark_naive.py")
    spec = importlib.util.spec_from_file_location("benchmark_naive", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name,variant,guidance,k", [("flux", "dev", 3.5, 1), ("flux", "dev", 3.5, STEPS),
                                                     ("sd3", "sd35", 7.0, 2)])
def test_naive_pipeline_loop_gives_our_lora_gradients(one_thread, name, variant, guidance, k):
    family = families.get(name)
    c = tiny_components(family, variant)
    lora.add_lora(c.denoiser, 4, 8.0, family.lora_targets)
    randomize_lora(c.denoiser, scale=0.1)
    rollout = make_rollout(family, c, STEPS, guidance, 32, 48)
    latents = x_T(rollout)
    ours = lora_grads(c.denoiser, fixed_reward(rollout(rollout.encode(PROMPTS), latents,
                                                       range(STEPS - k, STEPS))).sum())
    c.denoiser.enable_gradient_checkpointing()
    pipe = family.pipeline(c)
    pipe.set_progress_bar_config(disable=True)
    images = naive_module().naive_images(pipe, PROMPTS, latents.clone(), k, STEPS, guidance, 32, 48)
    assert images.requires_grad and images.shape == (2, 3, 32, 48)
    # SD3's pipeline encodes the "" negative at batch 2, ours at batch 1 (3e-8 apart, see test_families_sd3),
    # within the tolerance; FLUX's conditioning is the same bits.
    assert_grads_close(ours, lora_grads(c.denoiser, fixed_reward(images).sum()))


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["tiny_sd3", "tiny_flux"])
def test_benchmark_scripts_run_the_flow_families(tmp_path, spec):
    common = ["--config", f"config/align_prop.py:{spec}", "--tiny", "--precision", "no", "--batch", "1", "--steps", "3",
              "--ks", "1,3", "--iters", "1", "--out", str(tmp_path)]
    env = {"OMP_NUM_THREADS": "1"}
    result = run_script(["scripts/benchmark.py", *common], timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    ours = json.load(open(tmp_path / "bench_alignprop.json"))
    assert ours["model"] == "tiny" and all(row["finite"] for row in ours["k"].values())
    assert ours["denoiser_fwd_cfg_batch_tflop"] > 0
    result = run_script(["scripts/benchmark_naive.py", *common], timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    naive = json.load(open(tmp_path / "bench_naive.json"))
    assert set(naive["k"]) == {"1", "3"}
    assert all(r["finite"] and r["s_per_step_median"] > 0 for r in naive["k"].values())
    assert naive["lora_params"] == ours["lora_params"] > 0
    assert "| K | s/step | peak GiB |" in result.stdout


def test_fast_init_builds_every_tower_finite():
    """The random-weight build route (bf16 default dtype on the device) on tiny configs of every module kind."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from alignprop.families import flow
    from alignprop.families.flux import TINY

    with flow.fast_init("cpu"):
        modules = [FluxTransformer2DModel(**TINY["dev"][0]), AutoencoderKL(**flow.TINY_VAE16_CONFIG),
                   CLIPTextModel(CLIPTextConfig(**flow.TINY_CLIP_L_CONFIG)),
                   T5EncoderModel(T5Config(vocab_size=200, **flow.TINY_T5_CONFIG))]
    assert torch.get_default_dtype() == torch.float32
    for module in modules:
        assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in module.parameters())
    buffers = dict(modules[2].named_buffers())  # CLIP's position ids: computed, int64 (no repair needed)
    assert torch.equal(next(v for k, v in buffers.items() if k.endswith("position_ids")), torch.arange(77)[None])


@pytest.mark.slow
def test_generate_and_soup_scripts_with_sd3_loras(tmp_path):
    """scripts/generate.py (the pipeline, a LoRA mix, seeds) and scripts/evaluate_soup.py (our rollout with two
    adapters mixed in ΔW space) on tiny SD3.5 LoRAs."""
    import numpy as np
    from PIL import Image

    from alignprop import mixing

    sd3, guidance = families.get("sd3"), 7.0
    paths = []
    for seed in (1, 2):
        c = tiny_components(sd3, "sd35")
        lora_config = lora.add_lora(c.denoiser, 4, 8.0, sd3.lora_targets)
        randomize_lora(c.denoiser, seed=seed, scale=0.2)
        paths.append(str(tmp_path / f"lora_{seed}"))
        lora.save_lora(sd3, c.denoiser, lora_config, paths[-1])
    tiny = ["--config", "config/align_prop.py:tiny_sd3", "--config.sample.num_steps=2", "--config.train.k_max=2"]
    result = run_script(["scripts/generate.py", *tiny, "--prompt=a cat", "--prompt=an owl", f"--lora={paths[0]}:0.6",
                         f"--out={tmp_path / 'out'}", "--seed=3"], timeout=300, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    written = np.stack([np.asarray(Image.open(tmp_path / "out" / f"{i:05d}.png")) for i in range(2)])
    pipe = sd3.pipeline(tiny_components(sd3, "sd35", seed=42))  # the config's seed builds the tiny models
    pipe.set_progress_bar_config(disable=True)
    mixing.load_mix(pipe.transformer, sd3, [(paths[0], 0.6)])
    expected = mixing.generate(pipe, ["a cat", "an owl"], seed=3, num_steps=2, guidance_scale=guidance, batch_size=4)
    assert np.array_equal(written, np.stack([np.asarray(im) for im in pipe.numpy_to_pil(expected)]))
    result = run_script(["scripts/evaluate_soup.py", *tiny, f"--lora_a={paths[0]}", f"--lora_b={paths[1]}",
                         "--coefficients=0,1", f"--out={tmp_path / 'soup'}"], timeout=300, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.load(open(tmp_path / "soup" / "soup.json"))["rows"]
    assert [r["coefficient"] for r in rows] == [0.0, 1.0] and rows[0]["rewards"] != rows[1]["rewards"]
