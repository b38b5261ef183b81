"""The SDXL family's sources, published architecture, loading (folder, single file, another VAE) and VAE dtype."""

import pytest
import torch

from alignprop import families
from alignprop.errors import ConfigError
from alignprop.families import Source, parse_source
from alignprop.families.loading import ModelLoadError
from alignprop.speed import Prepared
from helpers import config, tiny_components

KEY = "config.model.source"
TINY_SDXL = "config/align_prop.py:tiny_sdxl"


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def sdxl():
    return families.get("sdxl")


@pytest.fixture(scope="module")
def components(sdxl):
    return tiny_components(sdxl)


def test_sources(sdxl):
    assert parse_source("tiny", "main", sdxl) == Source("tiny", "sdxl")
    assert parse_source("random:sdxl", "main", sdxl) == Source("random", "sdxl")
    for text, needle in (("tiny:sd1", "valid: tiny:sdxl"), ("random:sd15", "valid: random:sdxl")):
        with pytest.raises(ConfigError, match=f"the sdxl family has no .*; {needle}"):
            parse_source(text, "main", sdxl)
    expected = r"config.model.family='sdx' is not a model family; valid: sd, sdxl, sd3, flux"
    with pytest.raises(ConfigError, match=expected):
        families.get("sdx")


def test_tokenizers_are_the_real_clip_vocabulary_and_the_second_pads_with_bang(components):
    first, second = components.tokenizers
    ids = [t("a cat", padding="max_length", max_length=8).input_ids for t in (first, second)]
    assert ids[0][:4] == ids[1][:4] == [49406, 320, 2368, 49407]
    assert ids[0][-1] == 49407 and ids[1][-1] == 0  # CLIP-L pads with its end token, bigG with "!" (id 0)


def test_published_architecture_has_its_parameter_counts(sdxl):
    # On the meta device: shapes only. stabilityai/stable-diffusion-xl-base-1.0: UNet 2,567,463,684, CLIP ViT-L
    # text 123,060,480, OpenCLIP bigG text with projection 694,659,840, VAE 83,653,863 (REFERENCE_MODELS.md §9).
    c = sdxl.load(Source("random", "sdxl"), device="meta")
    counts = (count(c.denoiser), *(count(e) for e in c.text_encoders), count(c.vae))
    assert counts == (2_567_463_684, 123_060_480, 694_659_840, 83_653_863)
    assert sdxl.image_size(c) == (1024, 1024) and sdxl.latent_shape(c, 768, 1344) == (4, 96, 168)
    assert c.vae.config.scaling_factor == 0.13025 and c.vae.config.force_upcast
    sdxl._check_added_conditioning(c, "random:sdxl")  # 6 x 256 + 1280 = 2816, the pipeline's check
    assert type(c.scheduler).__name__ == "DDIMScheduler" and not c.scheduler.config.clip_sample


def test_load_local_diffusers_folder(sdxl, components, tmp_path):
    pipe = sdxl.pipeline(components)
    pipe.register_to_config(force_zeros_for_empty_prompt=False)
    pipe.save_pretrained(tmp_path)
    loaded = sdxl.load(parse_source(str(tmp_path), "main", sdxl))
    assert type(loaded.scheduler).__name__ == "DDIMScheduler" and not loaded.scheduler.config.clip_sample
    assert loaded.pipeline_config == {"force_zeros_for_empty_prompt": False}  # the checkpoint's own
    pairs = zip(components.modules(), loaded.modules())
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for a, b in pairs for k in a.state_dict())


def test_another_vae_by_config(sdxl, components, tmp_path, offline):
    """config.model.vae: a VAE folder (or a pipeline folder's vae/) replaces the checkpoint's VAE."""
    import ml_collections
    from diffusers import AutoencoderKL

    other = tiny_components(sdxl, seed=5).vae
    other.register_to_config(force_upcast=False)  # as madebyollin/sdxl-vae-fp16-fix
    other.save_pretrained(tmp_path / "vae_only")
    loaded = sdxl.load(Source("tiny", "sdxl"), ml_collections.ConfigDict({"vae": str(tmp_path / "vae_only")}))
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in loaded.vae.state_dict().items())
    assert not torch.equal(loaded.vae.decoder.conv_out.weight, components.vae.decoder.conv_out.weight)
    assert sdxl.vae_dtype(loaded, torch.float16) == torch.float16  # fp16-safe: no upcast
    sdxl.pipeline(components).save_pretrained(tmp_path / "pipeline")
    loaded = sdxl.load(Source("tiny", "sdxl"), ml_collections.ConfigDict({"vae": str(tmp_path / "pipeline")}))
    assert torch.equal(loaded.vae.decoder.conv_out.weight, components.vae.decoder.conv_out.weight)
    AutoencoderKL(latent_channels=16, block_out_channels=(8,), norm_num_groups=8).save_pretrained(tmp_path / "vae16")
    with pytest.raises(ModelLoadError, match="has 16 latent channels but the denoiser takes 4"):
        sdxl.load(Source("tiny", "sdxl"), ml_collections.ConfigDict({"vae": str(tmp_path / "vae16")}))
    (tmp_path / "empty").mkdir()
    for name, needle in ((str(tmp_path / "empty"), "a local folder: .*must hold a VAE"),
                         ("no-such-org/no-such-vae", "not a local folder, so a hub id .*Check the name for typos")):
        with pytest.raises(ModelLoadError, match=rf"(?s)config.model.vae={name!r}, {needle}"):
            sdxl.load(Source("tiny", "sdxl"), ml_collections.ConfigDict({"vae": name}))


def test_vae_dtype_is_the_pipelines_or_the_configs(sdxl):
    """auto: fp32 under fp16 for SDXL's VAE (force_upcast), else the inference dtype; or as configured."""
    for precision, vae_dtype, unet, vae in (("fp16", "auto", torch.float16, torch.float32),
                                            ("bf16", "auto", torch.bfloat16, torch.bfloat16),
                                            ("no", "auto", torch.float32, torch.float32),
                                            ("fp16", "fp16", torch.float16, torch.float16),
                                            ("bf16", "fp32", torch.bfloat16, torch.float32)):
        cfg = config(TINY_SDXL, {"mixed_precision": precision, "model.vae_dtype": vae_dtype})
        c = families.load_frozen(sdxl, Source("tiny", "sdxl"), cfg, torch.device("cpu"))
        assert (c.denoiser.dtype, c.text_encoders[1].dtype, c.vae.dtype) == (unet, unet, vae), (precision, vae_dtype)
    sd = families.get("sd")  # SD's pipeline never upcasts: unchanged
    c = families.load_frozen(sd, Source("tiny", "sd1"), config(overrides={"mixed_precision": "fp16"}), "cpu")
    assert c.vae.dtype == torch.float16


def test_fp32_vae_decodes_in_fp32_under_autocast(sdxl):
    """A VAE kept in fp32 under half-precision autocast decodes in fp32 (autocast off), bit for bit."""
    c = tiny_components(sdxl)
    prepared = Prepared(c.denoiser, c.vae)
    latents = torch.randn(2, 4, 16, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = prepared.decode(sdxl.vae_input(c, latents))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_autocast = prepared.decode(sdxl.vae_input(c, latents))
            c.vae.to(torch.bfloat16)  # a VAE in the autocast dtype still runs under autocast
            half = prepared.decode(sdxl.vae_input(c, latents))
    assert under_autocast.dtype == torch.float32 and torch.equal(under_autocast, plain)
    assert half.dtype == torch.bfloat16 and 0 < (half.float() - plain).abs().max() < 0.1


def test_pipeline_decodes_with_an_fp32_vae_beside_a_half_unet(sdxl):
    c = tiny_components(sdxl, dtype=torch.bfloat16)
    c.vae.to(torch.float32)
    pipe = sdxl.pipeline(c)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["a cat"], num_inference_steps=2, output_type="np").images  # diffusers alone fails here
    assert images.shape == (1, 32, 32, 3)
    sdxl.pipeline(c)  # a second pipeline of the same components adds no second cast
    assert len(c.vae.post_quant_conv._forward_pre_hooks) == 1


def test_config_checks(sdxl):
    from alignprop import config as configs

    cfg = config(TINY_SDXL, {"model.vae_dtype": "half", "model.vae": "./no/such/vae", "sample.height": 1020})
    found = "\n".join(configs.problems(cfg))
    assert "config.model.vae_dtype='half': must be one of auto, fp32, fp16, bf16" in found
    assert "config.model.vae='./no/such/vae': no such folder" in found
    assert "config.sample.height=1020: must be a positive multiple of 8 pixels (Stable Diffusion XL's" in found
    for name in ("tiny_sdxl", "aesthetic_sdxl", "aesthetic_sdxl_k1", "hps_sdxl"):
        cfg = config(f"config/align_prop.py:{name}")
        assert cfg.model.family == "sdxl" and not configs.problems(cfg), name
        assert 5.0 <= cfg.sample.guidance_scale <= 7.5 and cfg.sample.num_steps == (8 if name == "tiny_sdxl" else 50)


def test_single_file_checkpoints(sdxl, tmp_path, offline):
    from safetensors.torch import save_file

    unet_key = sdxl.single_file_prefix + "input_blocks.0.0.weight"
    sd_file = tmp_path / "sd15.safetensors"
    save_file({unet_key: torch.zeros(2), "cond_stage_model.transformer.x": torch.zeros(2)}, str(sd_file))
    with pytest.raises(ModelLoadError) as e:
        sdxl.load(parse_source(str(sd_file), "main", sdxl))
    message = str(e.value)
    assert f"{KEY}='{sd_file}' is not a usable Stable Diffusion XL checkpoint" in message
    assert "no 'conditioner.embedders.1.model.*' keys (SDXL's second text encoder (OpenCLIP bigG))" in message
    assert "config.model.family picks the family" in message
    # A sound SDXL file offline: diffusers needs the pipeline's config files from the hub; the message says so.
    xl_file = tmp_path / "sdxl.safetensors"
    save_file({unet_key: torch.zeros(2), "conditioner.embedders.1.model.ln_final.weight": torch.zeros(2)},
              str(xl_file))
    with pytest.raises(ModelLoadError) as e:
        sdxl.load(parse_source(str(xl_file), "main", sdxl))
    message = str(e.value)
    assert f"single-file checkpoint {KEY}='{xl_file}'" in message
    assert "StableDiffusionXLPipeline.from_single_file(PATH).save_pretrained(DIR)" in message
