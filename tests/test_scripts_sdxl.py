"""The scripts on tiny SDXL models in subprocesses, offline on the CPU (slow tier): the benchmark and its naive
baseline, generation with mixed LoRAs and the fused export, the soup evaluation."""

import json

import numpy as np
import pytest
from PIL import Image

from alignprop import families
from helpers import run_script, save_tiny_lora, tiny_components

pytestmark = pytest.mark.slow

TINY_SDXL = "config/align_prop.py:tiny_sdxl"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
SMALL = ["--precision", "no", "--batch", "1", "--steps", "3", "--iters", "1"]


def test_benchmark_and_naive_baseline_on_tiny_sdxl(tmp_path):
    result = run_script(["scripts/benchmark.py", "--config", "config/align_prop.py:aesthetic_sdxl", "--tiny", *SMALL,
                         "--ks", "1,uniform", "--out", str(tmp_path)], timeout=300, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.load(open(tmp_path / "bench_alignprop.json"))
    assert (data["family"], data["model"], data["size"], data["card"]) == ("sdxl", "tiny", [32, 32], "cpu")
    assert set(data["k"]) == {"1", "uniform"} and all(r["finite"] and r["s_per_step_median"] > 0
                                                      for r in data["k"].values())
    assert data["denoiser_fwd_cfg_batch_tflop"] > 0 and "| K | s/step | peak GiB | images/s |" in result.stdout
    result = run_script(["scripts/naive_sdxl.py", "--config", TINY_SDXL, "--tiny", *SMALL, "--ks", "1,3",
                         "--config.sample.width=48", "--out", str(tmp_path)], timeout=300, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.load(open(tmp_path / "bench_naive_sdxl.json"))
    assert data["size"] == [32, 48] and set(data["k"]) == {"1", "3"}
    assert all(r["finite"] and r["s_per_step_median"] > 0 for r in data["k"].values())
    assert "naive SDXL loop" in result.stdout
    sd_config = ["--config", "config/align_prop.py:tiny", "--tiny"]
    result = run_script(["scripts/naive_sdxl.py", *sd_config, *SMALL], timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "config.model.family='sd': this is SDXL's naive baseline" in result.stderr


def test_generate_with_sdxl_loras_and_the_fused_export(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from alignprop import mixing

    sdxl = families.get("sdxl")
    lora_a = save_tiny_lora(tmp_path / "a", family=sdxl, seed=1)
    lora_b = save_tiny_lora(tmp_path / "b", family=sdxl, seed=2, rank=2, alpha=2.0)
    out, fused = tmp_path / "out", tmp_path / "fused"
    texts = ["a photo of a cat", "an owl"]
    result = run_script(["scripts/generate.py", "--config", TINY_SDXL, "--config.seed=0",
                         *(f"--prompt={t}" for t in texts), f"--lora={lora_a}:0.5", f"--lora={lora_b}:0.3",
                         f"--out={out}", f"--fuse={fused}", "--seed=5",
                         "--config.sample.num_steps=3", "--config.sample.width=48"], timeout=300, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-4000:]
    written = np.stack([np.asarray(Image.open(out / f"{i:05d}.png")) for i in range(2)])
    assert written.shape == (2, 32, 48, 3)
    # Here, with the same seeds: the same mix through diffusers' pipeline gives the very same pixels.
    components = tiny_components(sdxl)
    pipe = sdxl.pipeline(components)
    pipe.set_progress_bar_config(disable=True)
    settings = dict(seed=5, num_steps=3, guidance_scale=5.0, batch_size=4, height=32, width=48)
    base = mixing.generate(pipe, texts, **settings)
    mixing.load_mix(pipe.unet, sdxl, [(lora_a, 0.5), (lora_b, 0.3)])
    expected = mixing.generate(pipe, texts, **settings)
    assert np.array_equal(written, np.stack([np.asarray(im) for im in pipe.numpy_to_pil(expected)]))
    assert np.abs(expected - base).max() > 1e-2  # the LoRAs do change the images
    # The fused export loads with diffusers alone (no watermarker) and gives the mixed pipeline's images.
    reloaded = StableDiffusionXLPipeline.from_pretrained(str(fused), add_watermarker=False)
    reloaded.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(mixing.generate(reloaded, texts, **settings), expected, atol=1e-5)  # fp32


def test_soup_on_tiny_sdxl(tmp_path):
    sdxl = families.get("sdxl")
    lora_a = save_tiny_lora(tmp_path / "a", family=sdxl, seed=1)
    result = run_script(["scripts/evaluate_soup.py", "--config", TINY_SDXL, f"--lora_a={lora_a}",
                         "--coefficients=0,1", f"--out={tmp_path / 'soup'}"],
                        timeout=300, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = json.load(open(tmp_path / "soup" / "soup.json"))["rows"]
    assert [r["adapter_weights"] for r in rows] == [{"lora_a": 0.0}, {"lora_a": 1.0}]
    means = [r["rewards"]["aesthetic"]["mean"] for r in rows]
    assert all(np.isfinite(means)) and means[0] != means[1]  # c = 0 is the base model, c = 1 LoRA A
