"""The SD 1.x/2.x family: model sources, loading and its errors, sizes, prompts, the published architectures."""

import pytest
import torch

from alignprop import families
from alignprop.errors import ConfigError
from alignprop.families import Source, parse_source
from alignprop.families.loading import ModelLoadError
from alignprop.tokenizers import clip_tokenizer, token_ids
from helpers import tiny_components

KEY = "config.model.source"


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_offline_tokenizer_is_the_real_clip_tokenizer():
    tok = clip_tokenizer()
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    ids = tok(["x " * 200], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert ids.shape == (1, 77)
    # SD 2.x's tokenizer pads with "!" (id 0), as open_clip does.
    assert clip_tokenizer(pad_token="!")("a cat", padding="max_length", max_length=8).input_ids[-1] == 0


def test_sources(sd, tmp_path):
    assert parse_source("tiny", "main", sd) == Source("tiny", "sd1")
    assert parse_source("tiny:sd2", "main", sd) == Source("tiny", "sd2")
    assert parse_source("random:sd21", "main", sd) == Source("random", "sd21")
    assert parse_source("org/name", "v1", sd) == Source("hub", "org/name", "v1")
    assert parse_source(str(tmp_path), "main", sd) == Source("folder", str(tmp_path), "main")
    for text, needle in (("tiny:sd3", "valid: tiny:sd1, tiny:sd2, tiny:sd2-base"),
                         ("random:sdxl", "valid: random:sd15, random:sd21, random:sd2-base"),
                         ("/nope/model.safetensors", "no such checkpoint file"),
                         ("./missing/folder", "no such folder"), ("", "give a hub id")):
        with pytest.raises(ConfigError) as e:
            parse_source(text, "main", sd)
        assert f"{KEY}={text!r}" in str(e.value) and needle in str(e.value)


def test_unknown_family_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"config.model.family='sdxl2' is not a model family; valid: sd"):
        families.get("sdxl2")


@pytest.mark.parametrize("variant,prediction", [("sd1", "epsilon"), ("sd2", "v_prediction"), ("sd2-base", "epsilon")])
def test_tiny_variants(sd, variant, prediction):
    c = tiny_components(sd, variant)
    assert type(c.scheduler).__name__ == "DDIMScheduler"
    cfg = c.scheduler.config
    assert (cfg.beta_schedule, cfg.clip_sample, cfg.set_alpha_to_one, cfg.steps_offset, cfg.prediction_type) == (
        "scaled_linear", False, False, 1, prediction)
    assert c.denoiser.config.use_linear_projection == variant.startswith("sd2")
    assert not c.denoiser.training and not any(p.requires_grad for m in c.modules() for p in m.parameters())


def test_prediction_type_override(sd):
    import ml_collections

    options = ml_collections.ConfigDict({"prediction_type": "v_prediction"})
    c = sd.load(Source("tiny", "sd1"), options)
    assert c.scheduler.config.prediction_type == "v_prediction"


def test_published_architectures_have_their_parameter_counts(sd):
    # On the meta device: shapes only, no memory, no time. runwayml/stable-diffusion-v1-5: UNet 859.5M,
    # VAE 83.7M, CLIP ViT-L/14 text encoder 123.1M; SD 2.x: UNet 865.9M, OpenCLIP-H text (23 layers) 340.4M.
    c = sd.load(Source("random", "sd15"), device="meta")
    assert (count(c.denoiser), count(c.vae), count(c.text_encoders[0])) == (859_520_964, 83_653_863, 123_060_480)
    assert c.scheduler.config.beta_schedule == "scaled_linear" and not c.scheduler.config.clip_sample
    assert c.tokenizers[0]("a cat").input_ids[0] == 49406  # CLIP's BOS: the real vocabulary
    c2 = sd.load(Source("random", "sd21"), device="meta")
    assert (count(c2.denoiser), count(c2.text_encoders[0])) == (865_910_724, 340_387_840)
    assert c2.scheduler.config.prediction_type == "v_prediction" and c2.denoiser.config.sample_size == 96
    assert sd.load(Source("random", "sd2-base"), device="meta").scheduler.config.prediction_type == "epsilon"


def test_load_local_diffusers_folder(sd, tmp_path):
    c = tiny_components(sd, "sd2")
    sd.pipeline(c).save_pretrained(tmp_path)
    loaded = sd.load(parse_source(str(tmp_path), "main", sd))
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"
    assert loaded.scheduler.config.prediction_type == "v_prediction"  # the checkpoint's own
    for a, b in ((c.denoiser, loaded.denoiser), (c.vae, loaded.vae), (c.text_encoders[0], loaded.text_encoders[0])):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_latent_shape_and_image_size(sd, components):
    assert sd.image_size(components) == (32, 32)  # tiny UNet sample_size 16 x VAE factor 2
    assert sd.image_size(components, 48, None) == (48, 32)
    assert sd.latent_shape(components, 48, 64) == (4, 24, 32)
    factor = sd.vae_scale_factor(components)
    with pytest.raises(ConfigError, match=rf"config.sample.width={4 * factor + 1} is not a multiple .* {factor} "
                                          rf".*use e.g. {4 * factor} or {5 * factor}"):
        sd.check_size(components, 32, 4 * factor + 1)


def test_long_prompt_truncation_is_logged_once_with_the_dropped_count(components, sd, caplog):
    tokenizer = components.tokenizers[0]
    long_prompt = "a watercolor painting of a " + "very " * 90 + "small cat"
    n_tokens = len(tokenizer(long_prompt, verbose=False).input_ids)
    assert n_tokens > tokenizer.model_max_length == 77
    with caplog.at_level("WARNING", logger="alignprop.tokenizers"):
        short = sd.encode(components, ["a cat", "a dog"])["encoder_hidden_states"]
        assert not caplog.records
        for _ in range(3):  # three batches, one warning
            embeds = sd.encode(components, [long_prompt, "a cat"])["encoder_hidden_states"]
    assert embeds.shape == short.shape == (2, 77, components.text_encoders[0].config.hidden_size)
    # One warning, ours: no per-batch repeats, no count-less transformers warning besides.
    assert [r.name for r in caplog.records] == ["alignprop.tokenizers"]
    message = caplog.records[0].getMessage()
    assert f"is {n_tokens} tokens long" in message and f"its last {n_tokens - 77} tokens are dropped" in message


def test_encode_is_the_pipelines_encoding(components, sd):
    pipe = sd.pipeline(components)
    ours = sd.encode(components, ["a cat", "an owl"])["encoder_hidden_states"]
    theirs, negative = pipe.encode_prompt(["a cat", "an owl"], "cpu", 1, True)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    torch.testing.assert_close(sd.negative(components, (32, 32))["encoder_hidden_states"].expand_as(negative), negative,
                               rtol=0, atol=0)
    assert token_ids(components.tokenizers[0], ["a cat"], "cpu").shape == (1, 77)


def test_offline_hub_id_error_names_what_was_looked_for(sd, offline):
    for name in ("no-such-org/no-such-model", "not a hub id!"):
        with pytest.raises(ModelLoadError) as e:
            sd.load(parse_source(name, "main", sd))
        message = str(e.value)
        assert f"{KEY}={name!r}" in message and "not a local folder, so a hub id" in message
        assert "Check the name for typos" in message and "local copy" in message and "hf download" in message
        assert "stacktrace above" not in message


def test_garbage_single_file_checkpoint_says_it_is_unreadable(sd, tmp_path):
    for name in ("model.safetensors", "model.ckpt"):
        path = tmp_path / name
        path.write_bytes(b"\x93NUMPY not a checkpoint" * 50)
        with pytest.raises(ModelLoadError) as e:
            sd.load(parse_source(str(path), "main", sd))
        message = str(e.value)
        assert f"{KEY}='{path}' is not a usable Stable Diffusion 1.x/2.x checkpoint" in message
        assert "cannot be read: it is corrupt, truncated or not a checkpoint" in message
        assert f"point `{KEY}` at a diffusers folder or a hub id" in message


def test_truncated_and_foreign_single_file_checkpoints(sd, tmp_path, offline):
    from safetensors.torch import save_file

    unet_key = sd.single_file_prefix + "input_blocks.0.0.weight"
    whole = tmp_path / "whole.safetensors"
    save_file({unet_key: torch.zeros(64, 4, 3, 3)}, str(whole))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="cannot be read: it is corrupt, truncated"):
        sd.load(parse_source(str(truncated), "main", sd))
    foreign = tmp_path / "foreign.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(2)}, str(foreign))
    with pytest.raises(ModelLoadError, match=r"holds no denoiser weights .*encoder.layer.0.weight"):
        sd.load(parse_source(str(foreign), "main", sd))
    # A sound SD file offline: diffusers needs the pipeline's config files from the hub; the message says so.
    with pytest.raises(ModelLoadError) as e:
        sd.load(parse_source(str(whole), "main", sd))
    message = str(e.value)
    assert f"single-file checkpoint {KEY}='{whole}'" in message
    assert "save_pretrained(DIR)" in message and "Traceback" not in message


def test_local_folder_with_a_truncated_weight_file(sd, components, tmp_path):
    sd.pipeline(components).save_pretrained(tmp_path)
    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError) as e:
        sd.load(parse_source(str(tmp_path), "main", sd))
    message = str(e.value)
    assert f"{KEY}='{tmp_path}'" in message and "a local folder" in message
    assert "unet/diffusion_pytorch_model.safetensors" in message and "re-download or re-save it" in message
