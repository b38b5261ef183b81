"""Model loading (local folder, errors offline), the offline tokenizer, LoRA set-up."""

import huggingface_hub
import pytest
import torch

from alignprop import models
from alignprop.errors import ConfigError
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


def test_long_prompt_truncation_is_logged_once_with_the_dropped_count(components, caplog):
    tokenizer = components.tokenizer
    long_prompt = "a watercolor painting of a " + "very " * 90 + "small cat"
    n_tokens = len(tokenizer(long_prompt, verbose=False).input_ids)
    assert n_tokens > tokenizer.model_max_length == 77
    with caplog.at_level("WARNING", logger="alignprop.models"):
        short = models.encode_prompts(components.text_encoder, tokenizer, ["a cat", "a dog"])
        assert not caplog.records
        for _ in range(3):  # three batches, one warning
            embeds = models.encode_prompts(components.text_encoder, tokenizer, [long_prompt, "a cat"])
    assert embeds.shape == short.shape == (2, 77, components.text_encoder.config.hidden_size)
    # One warning, ours: no per-batch repeats, no count-less transformers warning besides.
    assert [r.name for r in caplog.records] == ["alignprop.models"]
    message = caplog.records[0].getMessage()
    assert f"is {n_tokens} tokens long" in message and f"its last {n_tokens - 77} tokens are dropped" in message
    assert "'a watercolor painting of a very very" in message


def test_garbage_single_file_checkpoint_says_it_is_unreadable(tmp_path):
    for name in ("model.safetensors", "model.ckpt"):
        path = tmp_path / name
        path.write_bytes(b"\x93NUMPY not a checkpoint" * 50)
        with pytest.raises(models.ModelLoadError) as e:
            models.load_components(str(path))
        message = str(e.value)
        assert f"config.pretrained.model='{path}' is not a usable Stable Diffusion checkpoint" in message
        assert "cannot be read: it is corrupt, truncated or not a checkpoint" in message
        assert "point `config.pretrained.model` at a diffusers folder or a hub id" in message


def test_truncated_and_foreign_single_file_checkpoints(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    unet_key = models.SINGLE_FILE_UNET_PREFIX + "input_blocks.0.0.weight"
    whole = tmp_path / "whole.safetensors"
    save_file({unet_key: torch.zeros(64, 4, 3, 3)}, str(whole))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(models.ModelLoadError, match="cannot be read: it is corrupt, truncated"):
        models.load_components(str(truncated))
    foreign = tmp_path / "foreign.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(2)}, str(foreign))
    with pytest.raises(models.ModelLoadError, match=r"holds no Stable Diffusion UNet weights .*encoder.layer.0.weight"):
        models.load_components(str(foreign))
    # A sound SD file offline: diffusers needs the pipeline's config files from the hub; the message says so.
    with pytest.raises(models.ModelLoadError) as e:
        models.load_components(str(whole))
    message = str(e.value)
    assert f"single-file checkpoint config.pretrained.model='{whole}'" in message
    assert "save_pretrained(DIR)" in message and "Traceback" not in message


@pytest.mark.parametrize("model", ["runwayml/stable-diffusion-v1-5x", "not a hub id!"])
def test_wrong_or_uncached_hub_id_offline(model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(models.ModelLoadError) as e:
        models.load_components(model)
    message = str(e.value)
    assert f"config.pretrained.model={model!r}" in message and "not a local folder, so a hub id" in message
    assert "Check the name for typos" in message and "point `config.pretrained.model` at a local copy" in message
    assert "stacktrace above" not in message


def test_local_folder_with_a_truncated_weight_file(tmp_path):
    from diffusers import StableDiffusionPipeline

    comps = build_tiny_components(seed=0)
    pipe = StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp_path)
    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(models.ModelLoadError) as e:
        models.load_components(str(tmp_path))
    message = str(e.value)
    assert f"config.pretrained.model='{tmp_path}'" in message and "a local folder" in message
    assert "unet/diffusion_pytorch_model.safetensors" in message and "re-download or re-save it" in message


def test_resolution_error_says_what_would_fit():
    comps = models.Components(**build_tiny_components(seed=0))
    factor = models.vae_scale_factor(comps.vae)
    with pytest.raises(ConfigError, match=rf"config.sample.width={4 * factor + 1} is not a multiple .* {factor}; "
                                          rf"use e.g. {4 * factor} or {5 * factor}"):
        models.check_resolution(comps, None, 4 * factor + 1)


@pytest.mark.parametrize("backend,grad_steps,scope,compiled", [
    ("inductor", True, "model", False), ("aot_eager", True, "model", True), ("aot_eager", False, "model", True),
    ("aot_eager", False, "blocks", True),
])
def test_compile_switches(components, backend, grad_steps, scope, compiled):
    """Inductor is skipped on the CPU; otherwise the UNet is compiled in place (grad steps too) or as a
    view, or its blocks are, in place, for every call."""
    import ml_collections
    import torch._dynamo

    from alignprop.models import UNET_BLOCKS, compile_models
    from alignprop.sampling import is_compiled

    train = ml_collections.ConfigDict(dict(
        compile_unet=True, compile_grad_steps=grad_steps, compile_decoder=True, compile_mode="default",
        compile_backend=backend, compile_memory_budget=1.0, compile_scope=scope,
    ))
    try:
        nograd = compile_models(components, train)
        assert is_compiled(nograd) == compiled
        # In place for the grad steps, or (blocks) for every call.
        assert is_compiled(components.unet) == (compiled and (grad_steps or scope == "blocks"))
        assert is_compiled(components.vae.decoder) == compiled
        blocks = [m for m in components.unet.modules() if type(m).__name__ in UNET_BLOCKS]
        assert blocks and all((m._compiled_call_impl is not None) == (scope == "blocks" and compiled) for m in blocks)
    finally:
        torch._dynamo.reset()


def test_compiled_shapes_are_static(components):
    """A second batch size (evaluation's) gets its own static graph: torch.compile's default would
    recompile the first one shape-generic (symbolic sizes), slower for the training batch too."""
    import ml_collections
    import torch._dynamo

    from alignprop.models import compile_models

    graphs = []

    def recording_backend(gm, example_inputs):
        symbolic = any(isinstance(x, torch.SymInt) or (isinstance(x, torch.Tensor) and any(
            isinstance(s, torch.SymInt) for s in x.shape)) for x in example_inputs)
        graphs.append(symbolic)
        return gm.forward

    train = ml_collections.ConfigDict(dict(
        compile_unet=False, compile_grad_steps=False, compile_decoder=True, compile_mode="default",
        compile_backend=recording_backend, compile_memory_budget=1.0, compile_scope="model",
    ))
    try:
        compile_models(components, train)
        channels = components.vae.config.latent_channels
        with torch.no_grad():
            for batch in (1, 2, 1):
                components.vae.decoder(torch.randn(batch, channels, 8, 8))
        assert graphs == [False, False]  # one static graph per batch size, the first one reused
    finally:
        torch._dynamo.reset()
