"""LoRA saved in diffusers' pipeline format loads into a fresh pipeline and reproduces the trained UNet."""

import os

import torch

from alignprop import checkpoints, models
from alignprop.tiny import build_tiny_components
from conftest import randomize_lora


def test_saved_lora_loads_into_a_fresh_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    comps = models.Components(**build_tiny_components(seed=0))
    config = models.add_lora(comps.unet, rank=4, alpha=8.0)  # alpha != rank: the metadata matters
    randomize_lora(comps.unet, seed=1)
    checkpoints.save_lora(comps.unet, config, str(tmp_path))
    assert os.path.exists(tmp_path / checkpoints.LORA_WEIGHTS)

    fresh = build_tiny_components(seed=0)
    pipe = StableDiffusionPipeline(**fresh, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    x = torch.randn(2, 4, 16, 16)
    emb = torch.randn(2, 77, 32)
    with torch.no_grad():
        base = pipe.unet(x, 10, encoder_hidden_states=emb).sample
        pipe.load_lora_weights(str(tmp_path))
        assert pipe.get_active_adapters(), "no adapter became active: the LoRA silently loaded nothing"
        loaded = pipe.unet(x, 10, encoder_hidden_states=emb).sample
        trained = comps.unet(x, 10, encoder_hidden_states=emb).sample
    assert not torch.allclose(base, trained)
    torch.testing.assert_close(loaded, trained, atol=1e-6, rtol=1e-5)


def test_load_lora_round_trip(tmp_path):
    comps = models.Components(**build_tiny_components(seed=0))
    config = models.add_lora(comps.unet, rank=4, alpha=4.0)
    randomize_lora(comps.unet, seed=2)
    checkpoints.save_lora(comps.unet, config, str(tmp_path))
    other = models.Components(**build_tiny_components(seed=0))
    models.add_lora(other.unet, rank=4, alpha=4.0)
    checkpoints.load_lora(other.unet, str(tmp_path))
    a, b = comps.unet.state_dict(), other.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
