"""End to end: `scripts/generate.py` on tiny models, offline: PNGs, seeds, LoRA weights, the fused export."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from alignprop import generation, models
from alignprop.tiny import build_tiny_components
from conftest import run_script
from test_generation import save_tiny_lora

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # as the in-process side below: bitwise-comparable numbers, and faster
SETTINGS = ["--seed=5", "--num_steps=3", "--guidance_scale=7.5"]


@pytest.fixture(autouse=True)
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    generation.build_pipeline(models.Components(**build_tiny_components(seed=0))).save_pretrained(root / "tiny_sd")
    (root / "prompts.txt").write_text("# a comment\nthree apples\n")
    return dict(
        root=root,
        model=str(root / "tiny_sd"),
        lora_a=save_tiny_lora(root / "lora_a", seed=1),
        lora_b=save_tiny_lora(root / "lora_b", seed=2),
    )


def read_pngs(folder, count):
    return np.stack([np.asarray(Image.open(os.path.join(folder, f"{i:05d}.png"))) for i in range(count)])


def test_pngs_seeds_and_a_zero_weight_lora_give_the_base_model(saved):
    out = saved["root"] / "out_zero"
    result = run_script(
        ["scripts/generate.py", f"--model={saved['model']}", "--prompt=a photo of a cat", "--prompt=an owl",
         f"--prompt_file={saved['root'] / 'prompts.txt'}", f"--lora={saved['lora_a']}:0", "--batch_size=2",
         f"--out={out}", *SETTINGS],
        timeout=300, env=ONE_THREAD,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert sorted(os.listdir(out)) == ["00000.png", "00001.png", "00002.png", "prompts.json"]
    record = json.load(open(out / "prompts.json"))
    assert [(r["prompt"], r["seed"]) for r in record["images"]] == [
        ("a photo of a cat", 5), ("an owl", 6), ("three apples", 7)
    ]
    assert record["settings"]["loras"] == [{"path": saved["lora_a"], "weight": 0.0}]
    written = read_pngs(out, 3)
    assert written.shape == (3, 32, 32, 3)

    # The base model without any LoRA, in this process, with the same seeds: the very same pixels.
    pipe = generation.build_pipeline(models.load_components(saved["model"]))
    base = generation.generate(pipe, ["a photo of a cat", "an owl", "three apples"], 5, 3, 7.5, batch_size=2)
    assert np.array_equal(written, np.stack([np.asarray(im) for im in pipe.numpy_to_pil(base)]))


def test_two_loras_and_the_fused_export_on_model_tiny(saved):
    from diffusers import StableDiffusionPipeline

    out, fused = saved["root"] / "out_fused", saved["root"] / "fused_sd"
    texts = ["a photo of a cat", "an owl"]
    result = run_script(
        ["scripts/generate.py", "--model=tiny", "--tiny_seed=0", *[f"--prompt={t}" for t in texts],
         f"--lora={saved['lora_a']}:0.8", f"--lora={saved['lora_b']}/pytorch_lora_weights.safetensors:0.5",
         f"--out={out}", f"--fuse={fused}", *SETTINGS],
        timeout=300, env=ONE_THREAD,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    with_loras = read_pngs(out, 2)

    pipe = StableDiffusionPipeline.from_pretrained(str(fused))
    images = generation.generate(pipe, texts, 5, 3, 7.5, batch_size=4)
    reloaded = np.stack([np.asarray(im) for im in pipe.numpy_to_pil(images)])
    # fp32 agreement is tested in test_generation; here PNG rounding may move a pixel by one level.
    assert np.abs(reloaded.astype(int) - with_loras.astype(int)).max() <= 1
    base = generation.generate(generation.build_pipeline(models.load_components("tiny")), texts, 5, 3, 7.5, 4)
    assert np.abs(base - images).max() > 1e-2  # the LoRAs did change the images


def test_a_missing_lora_path_is_named(saved):
    missing = str(saved["root"] / "no_such_run")
    result = run_script(["scripts/generate.py", "--model=tiny", "--prompt=x", f"--lora={missing}:0.5"], timeout=120)
    assert result.returncode != 0
    assert f"LoRA path {missing!r} does not exist" in result.stderr
    assert "Traceback" not in result.stderr
