"""Configs: every named experiment builds and validates; overrides work; bad values name their key."""

import importlib.util
import os

import pytest

from alignprop.validation import ConfigError, validate
from conftest import REPO, run_script


def _load():
    spec = importlib.util.spec_from_file_location("align_prop_config", os.path.join(REPO, "config", "align_prop.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CONFIGS = _load()


@pytest.mark.parametrize("name", sorted(CONFIGS.EXPERIMENTS))
def test_every_named_config_builds(name):
    config = CONFIGS.get_config(name)
    assert config.sample.num_steps >= 1 and config.train.total_batch_size >= 1
    config.lock()  # no experiment adds a key that base() does not declare
    assert set(config.keys()) == set(CONFIGS.base().keys())


@pytest.mark.parametrize("name", ["aesthetic", "aesthetic_k1", "evaluate", "tiny"])
def test_named_configs_validate(name):
    validate(CONFIGS.get_config(name), num_processes=1)


@pytest.mark.parametrize("processes", [1, 2, 4, 8])
def test_paper_batch_on_any_gpu_count(processes):
    validate(CONFIGS.get_config("aesthetic"), num_processes=processes)


def test_paper_settings():
    c = CONFIGS.get_config("aesthetic")
    assert (c.sample.num_steps, c.sample.guidance_scale, c.sample.eta) == (50, 7.5, 0.0)
    assert (c.train.learning_rate, c.train.adam_weight_decay, c.train.max_grad_norm) == (1e-3, 0.1, 5.0)
    assert (c.train.loss_coeff, c.train.total_batch_size, c.train.total_samples_per_epoch) == (0.01, 128, 256)
    assert (c.lora.rank, c.lora.alpha) == (4, 4.0)
    k1 = CONFIGS.get_config("aesthetic_k1")
    assert (k1.train.truncation, k1.train.k) == ("fixed", 1)


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("reward_fn", "aesthetics", "valid: aesthetic"),
        ("prompt_fn", "animals", "simple_animals"),
        ("train.learning_rate", -1.0, "train.learning_rate=-1.0"),
        ("sample.guidance_scale", -2.0, "sample.guidance_scale"),
        ("sample.eta", 1.5, "sample.eta"),
        ("train.truncation", "random", "fixed, uniform, gaussian"),
        ("train.k_max", 99, "k_max <= sample.num_steps=50"),
        ("train.total_batch_size", 130, "train.total_batch_size=130 is not a multiple"),
        ("mixed_precision", "fp8", "mixed_precision"),
        ("resume_from", "/no/such/run", "resume_from"),
    ],
)
def test_bad_values_name_their_key(key, value, needle):
    config = CONFIGS.get_config("aesthetic")
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ConfigError) as e:
        validate(config, num_processes=1)
    assert needle in str(e.value)
    assert f"config.{key}" in str(e.value) or key.split(".")[-1] in str(e.value)


def test_command_line_overrides_and_errors():
    """Through the real script: overrides are applied, every bad value is listed, nothing is loaded."""
    result = run_script(
        [
            "scripts/train.py",
            "--config", "config/align_prop.py:tiny",
            "--config.train.learning_rate=-1",
            "--config.sample.eta=2",
            "--config.reward_fn=nope",
            "--config.train.total_batch_size=5",
        ],
        timeout=120,
    )
    assert result.returncode != 0
    err = result.stderr
    for needle in (
        "config.train.learning_rate=-1.0",
        "config.sample.eta=2.0",
        "config.reward_fn='nope' is not a reward; valid: aesthetic",
        "config.train.total_batch_size=5 is not a multiple",
    ):
        assert needle in err, err[-3000:]
    assert "Traceback" not in err


def test_unknown_config_field_is_rejected():
    result = run_script(["scripts/train.py", "--config", "config/align_prop.py:tiny", "--config.train.lr=1"])
    assert result.returncode != 0 and "lr" in result.stderr
