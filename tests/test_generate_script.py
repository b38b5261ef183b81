"""End to end: `scripts/generate.py` on a saved tiny pipeline, offline: PNGs, seeds, LoRA weights, the fused export."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from alignprop import generation, mixing, models
from alignprop.tiny import build_tiny_components
from conftest import run_script
from test_generation import save_tiny_lora

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # as the in-process side below: bitwise-comparable numbers, and faster
SETTINGS = ["--seed=5", "--num_steps=3", "--guidance_scale=7.5"]


pytestmark = pytest.mark.usefixtures("one_thread")


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


def to_uint8(pipe, images):
    return np.stack([np.asarray(im) for im in pipe.numpy_to_pil(images)])


def read_pngs(folder, count):
    return np.stack([np.asarray(Image.open(os.path.join(folder, f"{i:05d}.png"))) for i in range(count)])


def test_pngs_lora_weights_seeds_and_the_fused_export(saved):
    from diffusers import StableDiffusionPipeline

    out, fused = saved["root"] / "out", saved["root"] / "fused_sd"
    texts = ["a photo of a cat", "an owl", "three apples"]  # the last one from the prompt file
    result = run_script(
        ["scripts/generate.py", f"--model={saved['model']}", f"--prompt={texts[0]}", f"--prompt={texts[1]}",
         f"--prompt_file={saved['root'] / 'prompts.txt'}", f"--lora={saved['lora_a']}:0",
         f"--lora={saved['lora_b']}/pytorch_lora_weights.safetensors:0.7", "--batch_size=2",
         f"--out={out}", f"--fuse={fused}", *SETTINGS],
        timeout=300, env=ONE_THREAD,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert sorted(os.listdir(out)) == ["00000.png", "00001.png", "00002.png", "prompts.json"]
    record = json.load(open(out / "prompts.json"))
    assert [(r["prompt"], r["seed"]) for r in record["images"]] == [(texts[0], 5), (texts[1], 6), (texts[2], 7)]
    assert [lora["weight"] for lora in record["settings"]["loras"]] == [0.0, 0.7]
    written = read_pngs(out, 3)
    assert written.shape == (3, 32, 32, 3)

    # Here, with the same seeds: LoRA B alone at 0.7 gives the very same pixels (LoRA A at weight 0 adds nothing).
    pipe = generation.build_pipeline(models.load_components(saved["model"]))
    base = generation.generate(pipe, texts, 5, 3, 7.5, batch_size=2)
    mixing.load_lora(pipe, saved["lora_b"], "b")
    mixing.set_mix(pipe, ["b"], [0.7])
    expected = generation.generate(pipe, texts, 5, 3, 7.5, batch_size=2)
    assert np.array_equal(written, to_uint8(pipe, expected))
    assert np.abs(expected - base).max() > 1e-2  # the LoRA does change the images

    # The fused export loads with diffusers alone and gives the LoRA pipeline's images.
    reloaded = generation.generate(StableDiffusionPipeline.from_pretrained(str(fused)), texts, 5, 3, 7.5, batch_size=2)
    np.testing.assert_allclose(reloaded, expected, atol=1e-5)  # fp32


def test_a_missing_lora_path_is_named(saved):
    missing = str(saved["root"] / "no_such_run")
    result = run_script(["scripts/generate.py", "--model=tiny", "--prompt=x", f"--lora={missing}:0.5"], timeout=120)
    assert result.returncode != 0
    assert f"LoRA path {missing!r} does not exist" in result.stderr
    assert "Traceback" not in result.stderr
