"""Generation through diffusers' pipeline: seeded per image, LoRA weight 0 = base, fused export = LoRA pipeline."""

import numpy as np
import pytest

from alignprop import checkpoints, generation, mixing, models
from alignprop.tiny import build_tiny_components
from conftest import randomize_lora

pytestmark = pytest.mark.usefixtures("one_thread")


PROMPTS = ["a photo of a cat", "an owl", "three apples"]
SETTINGS = dict(seed=7, num_steps=3, guidance_scale=7.5)


def save_tiny_lora(path, seed, rank=4, alpha=8.0):
    comps = models.Components(**build_tiny_components(seed=0))
    config = models.add_lora(comps.unet, rank=rank, alpha=alpha)
    randomize_lora(comps.unet, seed=seed, scale=0.2)
    checkpoints.save_lora(comps.unet, config, str(path))
    return str(path)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny SD pipeline folder (as `save_pretrained` writes it) and two LoRAs for it."""
    root = tmp_path_factory.mktemp("gen")
    generation.build_pipeline(models.Components(**build_tiny_components(seed=0))).save_pretrained(root / "tiny_sd")
    return dict(
        model=str(root / "tiny_sd"),
        lora_a=save_tiny_lora(root / "lora_a", seed=1),
        lora_b=save_tiny_lora(root / "lora_b", seed=2, rank=2, alpha=2.0),
        root=root,
    )


def pipeline(model):
    return generation.build_pipeline(models.load_components(model))


def test_seeded_images_do_not_depend_on_batch_size(saved):
    pipe = pipeline(saved["model"])
    one_batch = generation.generate(pipe, PROMPTS, batch_size=3, **SETTINGS)
    assert one_batch.shape == (3, 32, 32, 3) and one_batch.dtype == np.float32
    again = generation.generate(pipe, PROMPTS, batch_size=3, **SETTINGS)
    assert np.array_equal(one_batch, again)
    in_pairs = generation.generate(pipe, PROMPTS, batch_size=2, **SETTINGS)
    np.testing.assert_allclose(in_pairs, one_batch, atol=1e-5)
    other_seed = generation.generate(pipe, PROMPTS, batch_size=3, **{**SETTINGS, "seed": 8})
    assert np.abs(other_seed - one_batch).max() > 1e-2


def test_lora_weight_zero_reproduces_the_base_model(saved):
    pipe = pipeline(saved["model"])
    base = generation.generate(pipe, PROMPTS[:2], batch_size=2, **SETTINGS)
    mixing.load_lora(pipe, saved["lora_a"], "a")
    mixing.set_mix(pipe, ["a"], [0.0])
    assert np.array_equal(generation.generate(pipe, PROMPTS[:2], batch_size=2, **SETTINGS), base)
    mixing.set_mix(pipe, ["a"], [1.0])
    assert np.abs(generation.generate(pipe, PROMPTS[:2], batch_size=2, **SETTINGS) - base).max() > 1e-2


def test_fused_export_reproduces_the_lora_pipeline(saved):
    from diffusers import StableDiffusionPipeline

    pipe = pipeline(saved["model"])
    mixing.load_lora(pipe, saved["lora_a"], "a")
    mixing.load_lora(pipe, saved["lora_b"], "b")
    mixing.set_mix(pipe, ["a", "b"], [0.7, 0.4])
    with_lora = generation.generate(pipe, PROMPTS, batch_size=3, **SETTINGS)
    out = saved["root"] / "fused"
    generation.export_fused(pipe, str(out))

    fused = StableDiffusionPipeline.from_pretrained(str(out))
    assert type(fused.scheduler).__name__ == "DDIMScheduler"
    assert not any("lora" in name for name, _ in fused.unet.named_parameters())
    np.testing.assert_allclose(generation.generate(fused, PROMPTS, batch_size=3, **SETTINGS), with_lora, atol=1e-5)
    # ...and through our own loader (a local folder), as scripts/generate.py --model OUT_DIR does.
    np.testing.assert_allclose(
        generation.generate(pipeline(str(out)), PROMPTS, batch_size=3, **SETTINGS), with_lora, atol=1e-5
    )
