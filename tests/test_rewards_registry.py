"""The reward registry: names, weighted sums (parsing, errors, logging), metadata checks at start-up."""

import pytest
import torch

from alignprop import rewards
from alignprop.rewards import RewardSpecError, UnknownRewardError, parse_reward_spec
from alignprop.validation import ConfigError, validate
from config.align_prop import EXPERIMENTS, tiny


def test_single_name_is_weight_one():
    assert parse_reward_spec("hps") == [("hps", 1.0)]


def test_weighted_sum_parses_weights_and_spaces():
    assert parse_reward_spec(" aesthetic:1.0 , hps:0.5,compressibility:-2e-2") == [
        ("aesthetic", 1.0),
        ("hps", 0.5),
        ("compressibility", -0.02),
    ]
    assert parse_reward_spec("aesthetic,hps:2") == [("aesthetic", 1.0), ("hps", 2.0)]


def test_unknown_component_lists_valid_names():
    with pytest.raises(UnknownRewardError) as e:
        rewards.check_name("aesthetic:1.0,hsp:0.5")
    message = str(e.value)
    assert "'hsp'" in message and "config.reward_fn" in message
    for name in rewards.REWARDS:
        assert name in message


@pytest.mark.parametrize("spec", ["aesthetic:abc", "aesthetic:1,hps:", "hps:nan", "hps:inf", "hps:0"])
def test_bad_weight_is_a_clear_error(spec):
    with pytest.raises(RewardSpecError, match=r"weight of '(aesthetic|hps)'.*finite nonzero number"):
        rewards.check_name(spec, key="reward_fn")


@pytest.mark.parametrize("spec", ["aesthetic,,hps", "aesthetic:1,", ":1.0"])
def test_empty_component_is_a_clear_error(spec):
    with pytest.raises(RewardSpecError, match="empty component"):
        rewards.check_name(spec)


def test_duplicate_component_is_an_error():
    with pytest.raises(RewardSpecError, match="'hps' appears twice"):
        rewards.check_name("hps:1,aesthetic:1,hps:2")


def test_validation_reports_bad_combination():
    config = tiny()
    config.reward_fn = "aesthetic:1.0,nope:2"
    with pytest.raises(ConfigError, match=r"config.reward_fn=.*'nope' is not a reward"):
        validate(config)


def _fake_factories(monkeypatch, values):
    """Replace the registry's factories by constant rewards; returns the list of names built."""
    built = []

    def factory(name):
        def make(config, device, dtype):
            built.append(name)

            def reward_fn(images, prompts, metadata):
                r = images.mean((1, 2, 3)) * 0 + values[name]
                return r, {"extra": torch.full((len(images),), 10 * values[name])}

            return reward_fn

        return make

    monkeypatch.setattr(rewards, "_factory", factory)
    return built


def test_weighted_sum_values_info_and_single_load(monkeypatch):
    built = _fake_factories(monkeypatch, {"aesthetic": 2.0, "hps": 0.25, "compressibility": -3.0})
    config = tiny()
    config.reward_fn = "aesthetic:1.0,hps:4,compressibility:-0.5"
    reward_fn = rewards.make_reward_fn(config, torch.device("cpu"), torch.float32)
    images = torch.rand(3, 3, 8, 8)
    for _ in range(2):  # scorers are built once, not per call
        total, info = reward_fn(images, ["a"] * 3, [{}] * 3)
    assert sorted(built) == ["aesthetic", "compressibility", "hps"]
    torch.testing.assert_close(total, torch.full((3,), 2.0 + 1.0 + 1.5))
    assert set(info) == {"aesthetic", "hps", "compressibility", "aesthetic/extra", "hps/extra", "compressibility/extra"}
    torch.testing.assert_close(info["hps"], torch.full((3,), 0.25))
    torch.testing.assert_close(info["compressibility/extra"], torch.full((3,), -30.0))


def test_plain_name_returns_the_reward_itself(monkeypatch):
    _fake_factories(monkeypatch, {"hps": 0.25})
    config = tiny()
    config.reward_fn = "hps"
    _, info = rewards.make_reward_fn(config, torch.device("cpu"), torch.float32)(torch.rand(2, 3, 8, 8), ["a"] * 2, [{}] * 2)
    assert set(info) == {"extra"}


def test_weighted_sum_of_real_tiny_rewards_is_differentiable():
    config = tiny()
    config.reward_fn = "hps:0.5,compressibility:-0.01"
    reward_fn = rewards.make_reward_fn(config, torch.device("cpu"), torch.float32)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).requires_grad_()
    total, info = reward_fn(images, ["a cat", "two dogs"], [{}, {}])
    total.sum().backward()
    assert total.shape == (2,) and total.dtype == torch.float32
    torch.testing.assert_close(total.detach(), 0.5 * info["hps"] - 0.01 * info["compressibility"])
    assert info["compressibility/jpeg_kb"].shape == (2,)
    assert images.grad.abs().sum() > 0


def test_object_count_with_prompts_lacking_metadata_fails_at_start_up():
    config = tiny()
    config.reward_fn = "aesthetic:1,object_count:0.1"
    with pytest.raises(ConfigError) as e:
        validate(config)
    message = str(e.value)
    assert "config.prompt_fn='simple_animals'" in message and "config.eval_prompt_fn='eval_simple_animals'" in message
    assert "object/count" in message and "counting" in message
    config.prompt_fn, config.eval_prompt_fn = "counting", "eval_counting"
    validate(config)


def test_reward_loss():
    r = torch.tensor([1.0, 3.0])
    assert rewards.reward_loss(r).item() == -2.0
    assert rewards.reward_loss(r, target=2.0).item() == 1.0


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_every_experiment_validates(name):
    validate(EXPERIMENTS[name](), num_processes=1 if name == "tiny" else 4)  # the paper: 4 GPUs


def test_tiny_config_makes_every_reward_model_tiny():
    """Every reward sub-dict that names a model must be 'tiny' in the tiny config (offline runs of any reward)."""
    reward = tiny().reward
    models = {name: sub.get("model", sub.get("clip_model")) for name, sub in reward.items() if hasattr(sub, "keys")}
    assert {"aesthetic", "hps", "hps_v21", "pickscore", "clipscore", "object_count"} <= set(models)
    assert all(model in (None, "tiny") for model in models.values()), models


def test_unknown_single_name_message():
    with pytest.raises(UnknownRewardError, match=r"^config.reward_fn='nope' is not a reward; valid: aesthetic, "):
        rewards.check_name("nope")
