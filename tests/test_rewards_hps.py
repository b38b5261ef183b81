"""HPSv2 / v2.1: a tiny open_clip model saved as the real `{'state_dict': ...}` checkpoint, loaded by the real path."""

import json

import open_clip
import pytest
import torch

import reference_preprocess as ref
from alignprop.rewards import hps
from alignprop.rewards.loading import BadWeightsError, WeightsNotFoundError
from alignprop.rewards.towers import TINY_OPEN_CLIP_CONFIG
from helpers import config, make_reward


def base():
    return config("config/align_prop.py:hps")

TINY_ARCH = "alignprop-test-tiny-ViT"
PROMPTS = ["a photo of a cat", "an oil painting of a lighthouse at night"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """(path of a tiny HPS-format checkpoint, the model it holds); the architecture is registered with open_clip."""
    folder = tmp_path_factory.mktemp("open_clip_config")
    with open(folder / f"{TINY_ARCH}.json", "w") as f:
        json.dump(TINY_OPEN_CLIP_CONFIG, f)
    open_clip.add_model_config(str(folder / f"{TINY_ARCH}.json"))
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_ARCH, pretrained=None, output_dict=True)
    path = tmp_path_factory.mktemp("hps") / "HPS_v2_compressed.pt"
    torch.save({"state_dict": model.state_dict()}, path)  # the format of xswu/HPSv2's files
    return str(path), model


def _cfg(**overrides):
    cfg = base().reward.hps
    cfg.update(overrides)
    return cfg


def _images(n=2, size=40, seed=0):
    # 40x40 is not the tower's 32x32: the scorer resizes (and crops) through clip_preprocess.
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_checkpoint_loads_through_the_real_path(tiny_checkpoint):
    path, saved = tiny_checkpoint
    scorer = hps.build_scorer(_cfg(model=TINY_ARCH, path=path), "hps")
    for name, tensor in saved.state_dict().items():
        torch.testing.assert_close(scorer.model.state_dict()[name], tensor, msg=name)
    assert scorer.image_size == 32


def test_score_is_cosine_differentiable_shape_b(tiny_checkpoint):
    path, saved = tiny_checkpoint
    scorer = hps.build_scorer(_cfg(model=TINY_ARCH, path=path), "hps")
    images = _images().requires_grad_()
    scores = scorer(images, PROMPTS)
    assert scores.shape == (2,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert (scores.abs() <= 1 + 1e-5).all()  # a cosine: no logit scale
    scores.sum().backward()
    assert images.grad.abs().sum() > 0
    assert all(p.grad is None for p in scorer.parameters())  # frozen
    # The diagonal of normalized image·text features, computed the open_clip way.
    with torch.no_grad():
        tokenizer = open_clip.get_tokenizer(TINY_ARCH)
        pixels = hps.clip_preprocess(images, 32, scorer.mean, scorer.std, mode="letterbox")
        image_features = saved.encode_image(pixels, normalize=True)
        text_features = saved.encode_text(tokenizer(PROMPTS), normalize=True)
        expected = torch.diagonal(image_features @ text_features.T)
    torch.testing.assert_close(scores.detach(), expected)


@pytest.mark.parametrize("shape", [(48, 72), (72, 48), (512, 768)])
def test_non_square_images_are_letterboxed_as_hpsv2_does(tiny_checkpoint, shape):
    """Against the same model on the pixels of HPSv2's evaluation transform (ResizeMaxSize, zero fill), from uint8.

    Measured |difference| of the cosine (~0.15): 8e-6-1.1e-4 now (uint8 rounding); 0.020-0.048 with the former
    centre crop (bilinear).
    """
    path, saved = tiny_checkpoint
    scorer = hps.build_scorer(_cfg(model=TINY_ARCH, path=path), "hps")
    array = ref.photo("coffee", *shape)
    with torch.no_grad():
        ours = scorer(ref.as_tensor(array), PROMPTS[:1])
        image_features = saved.encode_image(ref.hpsv2(array, 32), normalize=True)
        text_features = saved.encode_text(open_clip.get_tokenizer(TINY_ARCH)(PROMPTS[:1]), normalize=True)
    torch.testing.assert_close(ours, (image_features * text_features).sum(-1), rtol=0, atol=3e-4)


def test_score_depends_on_the_prompt(tiny_checkpoint):
    path, _ = tiny_checkpoint
    scorer = hps.build_scorer(_cfg(model=TINY_ARCH, path=path), "hps")
    images = _images(1).expand(2, -1, -1, -1)
    scores = scorer(images, PROMPTS)
    assert not torch.allclose(scores[0], scores[1])


def test_mismatched_checkpoint_is_a_clear_error(tiny_checkpoint, tmp_path):
    path, saved = tiny_checkpoint
    state = dict(saved.state_dict())
    state.pop("text_projection")
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": state}, bad)
    with pytest.raises(RuntimeError, match=r"(?s)does not fit the open_clip model.*text_projection"):
        hps.build_scorer(_cfg(model=TINY_ARCH, path=str(bad)), "hps")
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        hps.build_scorer(_cfg(model=TINY_ARCH, path=str(tmp_path / "missing.pt")), "hps")


def test_unknown_architecture_is_a_start_up_problem():
    (problem,) = hps.problems(_cfg(model="ViT-Q-99"), "config.reward.hps")
    assert "config.reward.hps.model='ViT-Q-99': not an open_clip architecture" in problem and "ViT-H-14" in problem
    assert hps.problems(_cfg(), "config.reward.hps") == []


def test_random_weights_build_the_architecture_and_read_nothing():
    # On the meta device: open_clip ViT-H-14 (HPSv2's architecture), no file looked up.
    scorer = hps.build_scorer(_cfg(path="random", repo="no/such-repo"), "hps", device="meta")
    assert sum(p.numel() for p in scorer.model.parameters()) == 986_109_441


@pytest.mark.parametrize("name, file", [("hps", "HPS_v2_compressed.pt"), ("hps_v21", "HPS_v2.1_compressed.pt")])
def test_offline_error_names_repo_file_and_key(name, file, offline):
    cfg = base().reward[name]  # ViT-H-14 from the hub: the download fails before the model is built
    with pytest.raises(WeightsNotFoundError) as e:
        hps.build_scorer(cfg, name)
    message = str(e.value)
    assert "'xswu/HPSv2'" in message and repr(file) in message and f"config.reward.{name}.path" in message


def test_tiny_option_builds_offline_and_returns_float32():
    assert config().reward.hps.model == config().reward.hps_v21.model == "tiny"
    for name in ("hps", "hps_v21"):
        images = _images().requires_grad_()
        rewards, components, info = make_reward(name)(images, PROMPTS, [{}, {}])
        assert rewards.shape == (2,) and rewards.dtype == torch.float32 and info == {} and list(components) == [name]
        rewards.sum().backward()
        assert images.grad.abs().sum() > 0


def test_truncated_checkpoint_is_a_clear_error(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint
    truncated = tmp_path / "HPS_v2_compressed.pt"
    with open(path, "rb") as f:
        truncated.write_bytes(f.read()[:4096])
    with pytest.raises(BadWeightsError) as e:
        hps.build_scorer(_cfg(model=TINY_ARCH, path=str(truncated)), "hps")
    message = str(e.value)
    assert f"HPS checkpoint '{truncated}' (4096 bytes) could not be read: the file is corrupt, truncated" in message
    fix = "Point config.reward.hps.path at a good copy of 'HPS_v2_compressed.pt' of the hub repo 'xswu/HPSv2'"
    assert fix in message
