"""The LoRA: the only trainable part, in fp32; one writer (the pipeline's format) and one reader."""

import os

import pytest
import torch

from alignprop import lora
from alignprop.checkpoints import PROGRESS
from helpers import SD_TARGETS, randomize_lora, tiny_components


def trained(sd, seed, rank=4, alpha=8.0):
    """Tiny components with a random ("trained") LoRA; alpha != rank, so a loader that ignored the saved
    metadata would get the scale wrong."""
    c = tiny_components(sd)
    config = lora.add_lora(c.denoiser, rank, alpha, SD_TARGETS)
    randomize_lora(c.denoiser, seed=seed, scale=0.2)
    return c, config


def test_lora_is_the_only_trainable_part_and_fp32(sd):
    c = tiny_components(sd, dtype=torch.bfloat16)
    config = lora.add_lora(c.denoiser, 4, 8.0, sd.lora_targets)
    trainable = dict((n, p) for n, p in c.denoiser.named_parameters() if p.requires_grad)
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    frozen = [p for n, p in c.denoiser.named_parameters() if "lora_" not in n]
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in frozen)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} <= {"to_q", "to_k", "to_v", "0"}  # to_out.0
    assert config.r == 4 and config.lora_alpha == 8.0
    # Every attention projection of every attention block carries LoRA.
    n_attn = sum(1 for n, _ in c.denoiser.named_modules() if n.endswith(".to_q"))
    assert len(trainable) == 2 * 4 * n_attn


def test_saved_lora_loads_into_a_fresh_pipeline(sd, tmp_path):
    c, config = trained(sd, seed=1)
    lora.save_lora(sd, c.denoiser, config, str(tmp_path))
    file = tmp_path / lora.LORA_WEIGHTS
    assert os.stat(file).st_mode & 0o777 == 0o644
    pipe = sd.pipeline(tiny_components(sd))
    x, t = torch.randn(2, 4, 16, 16), 10
    emb = sd.encode(c, ["a cat", "an owl"])["encoder_hidden_states"]
    with torch.no_grad():
        base = pipe.unet(x, t, encoder_hidden_states=emb).sample
        pipe.load_lora_weights(str(tmp_path))
        assert pipe.get_active_adapters(), "no adapter became active: the LoRA silently loaded nothing"
        loaded = pipe.unet(x, t, encoder_hidden_states=emb).sample
        ours = c.denoiser(x, t, encoder_hidden_states=emb).sample
    assert not torch.allclose(base, ours)
    torch.testing.assert_close(loaded, ours, atol=1e-6, rtol=1e-5)


def test_round_trip_into_the_training_adapter(sd, tmp_path):
    c, config = trained(sd, seed=2, alpha=4.0)
    lora.save_lora(sd, c.denoiser, config, str(tmp_path))
    other = tiny_components(sd)
    lora.add_lora(other.denoiser, 4, 4.0, SD_TARGETS)
    lora.load_into(other.denoiser, sd, str(tmp_path))
    a, b = c.denoiser.state_dict(), other.denoiser.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_file_resolves_run_checkpoint_and_file_and_names_bad_paths(sd, tmp_path):
    c, config = trained(sd, seed=1)
    run, checkpoint = tmp_path / "run", tmp_path / "run" / "checkpoint_2"
    os.makedirs(checkpoint)
    lora.save_lora(sd, c.denoiser, config, str(run))
    lora.save_lora(sd, c.denoiser, config, str(checkpoint))
    assert lora.lora_file(str(run)) == str(run / lora.LORA_WEIGHTS)
    assert lora.lora_file(str(checkpoint)) == str(checkpoint / lora.LORA_WEIGHTS)
    assert lora.lora_file(str(run / lora.LORA_WEIGHTS)) == str(run / lora.LORA_WEIGHTS)
    with pytest.raises(lora.LoRAPathError, match="no_such_run.*does not exist"):
        lora.lora_file(str(tmp_path / "no_such_run"))
    unfinished = tmp_path / "unfinished"
    os.makedirs(unfinished / "checkpoint_4")
    (unfinished / "checkpoint_4" / PROGRESS).write_text("{}")
    with pytest.raises(lora.LoRAPathError, match="unfinished.*latest checkpoint is .*checkpoint_4"):
        lora.lora_file(str(unfinished))


def test_files_that_hold_no_lora_of_the_family_are_refused(sd, tmp_path):
    from safetensors.torch import save_file

    save_file({"down.lora_A.weight": torch.zeros(4, 32)}, str(tmp_path / "adapter.safetensors"))
    with pytest.raises(lora.LoRAFileError, match=r"no 'unet.'-prefixed keys.*not a LoRA of this model family"):
        lora.load_adapter(tiny_components(sd).denoiser, sd, str(tmp_path / "adapter.safetensors"), "a")
    (tmp_path / "corrupt.safetensors").write_bytes(b"not a safetensors file" * 10)
    with pytest.raises(lora.LoRAFileError, match="cannot be read: it is corrupt, truncated or not a LoRA"):
        lora.load_adapter(tiny_components(sd).denoiser, sd, str(tmp_path / "corrupt.safetensors"), "a")
