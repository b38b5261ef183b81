"""The aesthetic reward: real MLP file format, differentiable scorer, shared CLIP preprocessing."""

import os

import pytest
import torch

import reference_preprocess as ref
from alignprop.rewards import RewardSpecError, parse
from alignprop.rewards.aesthetic import AestheticMLP, build_scorer, load_mlp_state_dict
from alignprop.rewards.loading import BadWeightsError, WeightsNotFoundError
from alignprop.rewards.preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess
from helpers import SHARED_ASSETS, config, make_reward

REAL_MLP = os.path.join(SHARED_ASSETS, "sac+logos+ava1-l14-linearMSE.pth")


@pytest.mark.skipif(
    not os.path.exists(REAL_MLP),
    reason="needs the real LAION aesthetic MLP (sac+logos+ava1-l14-linearMSE.pth, 3.7 MB, a third-party file the "
    "project downloads at run time and does not ship) in ../shared/assets beside the checkout; the loader's "
    "format checks run on synthetic files in the tests below either way",
)
def test_real_mlp_file_loads_strictly():
    state = load_mlp_state_dict(REAL_MLP)
    assert set(state) == {f"layers.{i}.{w}" for i in (0, 2, 4, 6, 7) for w in ("weight", "bias")}
    mlp = AestheticMLP(768)
    mlp.load_state_dict(state, strict=True)
    # A real predictor scores on the ~1..10 scale; a unit embedding gives a value in a sane range.
    emb = torch.nn.functional.normalize(torch.randn(4, 768, generator=torch.Generator().manual_seed(0)), dim=-1)
    scores = mlp.eval()(emb).squeeze(-1)
    assert scores.shape == (4,) and torch.all(scores.abs() < 20)


def test_wrong_keys_are_reported(tmp_path):
    path = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(1)}, path)
    with pytest.raises(RuntimeError, match="Missing key"):
        _reward(mlp_path=str(path), clip_model="tiny")


def _reward(**aesthetic):
    return make_reward("aesthetic", {f"reward.aesthetic.{k}": v for k, v in aesthetic.items()})


def test_scorer_is_differentiable_and_shaped():
    reward_fn = _reward()
    images = torch.rand(3, 3, 40, 56, requires_grad=True)
    rewards, components, info = reward_fn(images, ["a", "b", "c"], [{}] * 3)
    assert torch.equal(components["aesthetic"], rewards.detach()) and info == {}
    assert rewards.shape == (3,) and rewards.dtype == torch.float32 and torch.isfinite(rewards).all()
    rewards.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_offline_mlp_error_names_repo_file_and_key(offline):
    from alignprop.rewards.loading import WeightsNotFoundError, hub_file

    with pytest.raises(WeightsNotFoundError) as e:
        hub_file("trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth", key="config.reward.aesthetic.mlp_path")
    msg = str(e.value)
    assert "trl-lib/ddpo-aesthetic-predictor" in msg and "aesthetic-model.pth" in msg
    assert "config.reward.aesthetic.mlp_path" in msg


def test_clip_preprocess_matches_manual_resize_and_normalize():
    images = torch.rand(2, 3, 64, 96)
    out = clip_preprocess(images, 32)
    # Shorter side to 32 (64x96 -> 32x48, bicubic with antialias, clipped), center crop 32x32 (columns 8..40).
    resized = torch.nn.functional.interpolate(images, size=(64, 48), mode="bicubic", antialias=True).clamp(0, 1)
    resized = torch.nn.functional.interpolate(resized, size=(32, 48), mode="bicubic", antialias=True).clamp(0, 1)
    crop = resized[..., :, 8:40]
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (crop - mean) / std)


@pytest.mark.parametrize("shape", [(48, 67), (67, 48), (512, 701)])
def test_scores_like_ddpo_clip_processor_on_non_square_images(shape):
    """The tiny reward vs the same tower and MLP on the pixels of transformers' CLIPImageProcessor (as ddpo-pytorch's
    aesthetic scorer and AlignProp's code preprocess), from a uint8 image.

    Measured |difference| (scores ~ -0.03): 5e-6-1.2e-5 now; 2.7e-4-1.9e-3 with the former bilinear preprocessing.
    """
    scorer = build_scorer(config().reward.aesthetic)
    array = ref.photo("astronaut", *shape)
    with torch.no_grad():
        ours = scorer(ref.as_tensor(array))
        embeds = scorer.vision_model(pixel_values=ref.transformers_clip(array, 32)).image_embeds
        expected = scorer.mlp(embeds / embeds.norm(dim=-1, keepdim=True)).squeeze(-1)
    torch.testing.assert_close(ours, expected, rtol=0, atol=5e-5)


def test_unknown_reward_lists_valid_names():
    with pytest.raises(RewardSpecError, match="valid: aesthetic"):
        parse("aesthetics")


def _mlp_file(tmp_path, content):
    """An MLP weights file of the real format (torch.save of the state dict), then altered by `content`."""
    path = tmp_path / "aesthetic-model.pth"
    torch.save(AestheticMLP(32).state_dict(), path)  # the tiny tower's projection size
    path.write_bytes(content(path.read_bytes()))
    return str(path)


@pytest.mark.parametrize(
    "content,needle",
    [
        (lambda data: data[: len(data) // 2], "could not be read: the file is corrupt, truncated or not a torch.save"),
        (lambda data: b"<html>404 Not Found</html>", "could not be read: the file is corrupt, truncated"),
    ],
)
def test_truncated_or_garbage_mlp_file(tmp_path, content, needle):
    path = _mlp_file(tmp_path, content)
    with pytest.raises(BadWeightsError) as e:
        _reward(mlp_path=path)
    message = str(e.value)
    assert f"Aesthetic MLP weights {path!r}" in message and needle in message
    assert "Point config.reward.aesthetic.mlp_path at a good copy of the LAION MLP" in message


def test_mlp_file_of_whole_file_is_loaded_and_not_a_state_dict_is_an_error(tmp_path):
    _reward(mlp_path=_mlp_file(tmp_path, lambda data: data))
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(BadWeightsError, match=r"hold a Tensor, not a state dict"):
        _reward(mlp_path=str(path))
    with pytest.raises(WeightsNotFoundError, match=r"aesthetic-missing.pth' do not exist. Point config.reward"):
        _reward(mlp_path=str(tmp_path / "aesthetic-missing.pth"))
