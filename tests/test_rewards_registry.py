"""The reward registry: names, weighted sums (parsing, errors, logging), metadata checks at start-up."""

import pytest
import torch

from alignprop import config as configs, rewards
from alignprop.config import ConfigError, check
from alignprop.rewards import RewardSpecError, parse
from helpers import REPO, config as tiny, make_reward

EXPERIMENTS = configs.experiments(f"{REPO}/config/align_prop.py")


def terms(spec):
    return list(parse(spec).terms)


def test_single_name_is_weight_one():
    assert terms("hps") == [("hps", 1.0)]
    assert parse("hps").columns == ["hps"]


def test_weighted_sum_parses_weights_and_spaces():
    assert terms(" aesthetic:1.0 , hps:0.5,compressibility:-2e-2") == [
        ("aesthetic", 1.0),
        ("hps", 0.5),
        ("compressibility", -0.02),
    ]
    assert terms("aesthetic,hps:2") == [("aesthetic", 1.0), ("hps", 2.0)]
    # Evaluation's columns: a weighted term's total differs from the term.
    assert parse("aesthetic:2").columns == ["total", "aesthetic"]
    assert parse("aesthetic:1,hps:20").columns == ["total", "aesthetic", "hps"]


def test_unknown_component_lists_valid_names():
    with pytest.raises(RewardSpecError) as e:
        parse("aesthetic:1.0,hsp:0.5")
    message = str(e.value)
    assert "'hsp'" in message and "config.reward_fn" in message
    for name in rewards.registry():
        assert name in message


@pytest.mark.parametrize("spec", ["aesthetic:abc", "aesthetic:1,hps:", "hps:nan", "hps:inf", "hps:0"])
def test_bad_weight_is_a_clear_error(spec):
    with pytest.raises(RewardSpecError, match=r"weight of '(aesthetic|hps)'.*finite nonzero number"):
        parse(spec, key="reward_fn")


@pytest.mark.parametrize("spec", ["aesthetic,,hps", "aesthetic:1,", ":1.0"])
def test_empty_component_is_a_clear_error(spec):
    with pytest.raises(RewardSpecError, match="empty term"):
        parse(spec)


def test_duplicate_component_is_an_error():
    with pytest.raises(RewardSpecError, match="'hps' appears twice"):
        parse("hps:1,aesthetic:1,hps:2")


def test_validation_reports_bad_combination():
    config = tiny()
    config.reward_fn = "aesthetic:1.0,nope:2"
    with pytest.raises(ConfigError, match=r"config.reward_fn=.*'nope' is not a reward"):
        check(config)


def _fake_builders(monkeypatch, values):
    """Replace the registry's builders by constant rewards; returns the list of names built."""
    import dataclasses

    built = []

    def builder(name):
        def build(cfg, seed=0, device=None, dtype=None):
            built.append(name)

            def reward_fn(images, prompts, metadata):
                r = images.mean((1, 2, 3)) * 0 + values[name]
                return r, {"extra": torch.full((len(images),), 10 * values[name])}

            return reward_fn

        return build

    fake = {name: dataclasses.replace(reward, build=builder(name)) for name, reward in rewards.registry().items()}
    monkeypatch.setattr(rewards, "registry", lambda: fake)
    return built


def test_weighted_sum_values_terms_info_and_single_load(monkeypatch):
    built = _fake_builders(monkeypatch, {"aesthetic": 2.0, "hps": 0.25, "compressibility": -3.0})
    reward_fn = make_reward("aesthetic:1.0,hps:4,compressibility:-0.5")
    images = torch.rand(3, 3, 8, 8)
    for _ in range(2):  # scorers are built once, not per call
        total, components, info = reward_fn(images, ["a"] * 3, [{}] * 3)
    assert sorted(built) == ["aesthetic", "compressibility", "hps"]
    torch.testing.assert_close(total, torch.full((3,), 2.0 + 1.0 + 1.5))
    assert set(components) == {"aesthetic", "hps", "compressibility"}
    assert set(info) == {"aesthetic/extra", "hps/extra", "compressibility/extra"}
    torch.testing.assert_close(components["hps"], torch.full((3,), 0.25))
    torch.testing.assert_close(info["compressibility/extra"], torch.full((3,), -30.0))


def test_a_single_reward_has_the_same_shape(monkeypatch):
    _fake_builders(monkeypatch, {"hps": 0.25})
    total, components, info = make_reward("hps")(torch.rand(2, 3, 8, 8), ["a"] * 2, [{}] * 2)
    assert torch.equal(total, components["hps"]) and set(info) == {"hps/extra"}


def test_weighted_sum_of_real_tiny_rewards_is_differentiable():
    reward_fn = make_reward("hps:0.5,compressibility:-0.01")
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).requires_grad_()
    total, components, info = reward_fn(images, ["a cat", "two dogs"], [{}, {}])
    total.sum().backward()
    assert total.shape == (2,) and total.dtype == torch.float32
    torch.testing.assert_close(total.detach(), 0.5 * components["hps"] - 0.01 * components["compressibility"])
    assert info["compressibility/jpeg_kb"].shape == (2,)
    assert images.grad.abs().sum() > 0


def test_object_count_with_prompts_lacking_metadata_fails_at_start_up():
    config = tiny()
    config.reward_fn = "aesthetic:1,object_count:0.1"
    with pytest.raises(ConfigError) as e:
        check(config)
    message = str(e.value)
    assert "config.prompt_fn='simple_animals'" in message and "config.eval_prompt_fn='eval_simple_animals'" in message
    assert "object/count" in message and "counting" in message
    config.prompt_fn, config.eval_prompt_fn = "counting", "eval_counting"
    check(config)


def test_reward_loss():
    r = torch.tensor([1.0, 3.0])
    assert rewards.reward_loss(r).item() == -2.0
    assert rewards.reward_loss(r, target=2.0).item() == 1.0


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_every_experiment_validates(name):
    # The paper's runs: 4 GPUs. `problems` reads no file: the hub's HPSv2 prompts are read by `check`, not offline here.
    config = tiny(f"config/align_prop.py:{name}")
    assert configs.problems(config, num_processes=1 if name.startswith("tiny") else 4) == []


def test_tiny_config_makes_every_reward_model_tiny():
    """Every reward sub-dict that names a model must be 'tiny' in the tiny config (offline runs of any reward)."""
    reward = tiny().reward
    models = {name: sub.get("model", sub.get("clip_model")) for name, sub in reward.items() if hasattr(sub, "keys")}
    assert {"aesthetic", "hps", "hps_v21", "pickscore", "clipscore", "object_count", "imagereward", "mps",
            "hpsv3"} <= set(models)
    assert all(model in (None, "tiny") for model in models.values()), models


def test_unknown_single_name_message():
    with pytest.raises(RewardSpecError, match=r"^config.reward_fn='nope' is not a reward; valid: aesthetic, "):
        parse("nope")


# Every reward that runs a neural network, in the half types on the CPU (F.interpolate's antialias has no CPU kernel
# for them: the resize runs in fp32 there).
NETWORK_REWARDS = ["aesthetic", "hps", "hps_v21", "pickscore", "clipscore", "object_count", "imagereward", "mps",
                   "hpsv3"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", NETWORK_REWARDS)
def test_half_types_on_the_cpu(name, dtype):
    from alignprop.rewards import build

    cfg = tiny("config/align_prop.py:tiny", {"prompt_fn": "counting"})
    images = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(0))
    metadata = [{"object": "apple", "count": 2}, {"object": "cup", "count": 1}]
    reference, _, _ = build(parse(name), cfg.reward, cfg.seed, torch.device("cpu"), torch.float32)(
        images, ["two apples", "one cup"], metadata)
    half = images.clone().requires_grad_()
    scores, _, _ = build(parse(name), cfg.reward, cfg.seed, torch.device("cpu"), dtype)(
        half, ["two apples", "one cup"], metadata)
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
    # Tiny random towers in half precision: close to fp32 relative to the scale of the scores.
    assert (scores.detach() - reference).abs().max() <= 0.1 * reference.abs().max() + 0.05, (scores, reference)
    scores.sum().backward()
    assert half.grad is not None and torch.isfinite(half.grad).all()
