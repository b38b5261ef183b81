"""Model loading (local folder, errors offline), the offline tokenizer, LoRA set-up."""

import pytest
import torch

from alignprop import models
from alignprop.tiny import build_tiny_components, clip_tokenizer


def test_offline_tokenizer_is_the_real_clip_tokenizer():
    tok = clip_tokenizer()
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    ids = tok(["x " * 200], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert ids.shape == (1, 77)


def test_load_local_diffusers_folder(tmp_path):
    from diffusers import StableDiffusionPipeline

    comps = build_tiny_components(seed=0)
    pipe = StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp_path)
    loaded = models.load_components(str(tmp_path))
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"
    cfg = loaded.scheduler.config
    assert (cfg.beta_schedule, cfg.clip_sample, cfg.set_alpha_to_one, cfg.steps_offset) == (
        "scaled_linear", False, False, 1,
    )
    for name in ("unet", "vae", "text_encoder"):
        a, b = comps[name].state_dict(), getattr(loaded, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_offline_hub_id_error_names_what_was_looked_for(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelLoadError) as e:
        models.load_components("no-such-org/no-such-model")
    msg = str(e.value)
    assert "config.pretrained.model='no-such-org/no-such-model'" in msg and "local copy" in msg


@pytest.mark.parametrize("path,needle", [("/nope/model.safetensors", "no such checkpoint file"),
                                         ("./missing/folder", "no such folder")])
def test_missing_local_paths(path, needle):
    with pytest.raises(models.ModelLoadError, match=needle):
        models.load_components(path)


def test_lora_is_the_only_trainable_part_and_fp32():
    comps = models.Components(**build_tiny_components(seed=0))
    models.freeze_and_cast(comps, torch.device("cpu"), torch.bfloat16)
    config = models.add_lora(comps.unet, rank=4, alpha=8.0)
    trainable = dict((n, p) for n, p in comps.unet.named_parameters() if p.requires_grad)
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    frozen = [p for n, p in comps.unet.named_parameters() if "lora_" not in n]
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in frozen)
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert targets <= {"to_q", "to_k", "to_v", "0"}  # to_out.0
    assert config.r == 4 and config.lora_alpha == 8.0
    # Every attention projection of every attention block carries LoRA.
    n_attn = sum(1 for n, m in comps.unet.named_modules() if n.endswith(".to_q"))
    assert len(trainable) == 2 * 4 * n_attn


def test_latent_shape_read_from_configs():
    comps = models.Components(**build_tiny_components(seed=0))
    assert models.latent_shape(comps.unet, comps.vae) == (4, 16, 16)
    assert models.latent_shape(comps.unet, comps.vae, 48, 64) == (4, 24, 32)
    with pytest.raises(ValueError, match="sample.height=33"):
        models.check_resolution(comps, 33, None)
