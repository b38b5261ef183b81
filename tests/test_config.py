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


def _with(config, key, value):
    """`config` with the dotted `key` set to `value`."""
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value
    return config


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
        ("sample.height", 500, "config.sample.height=500: must be a positive multiple of 8 pixels"),
        ("sample.width", 0, "config.sample.width=0: must be a positive multiple of 8"),
        ("sample.eta", -0.1, "config.sample.eta=-0.1: must be in [0, 1]"),
        ("train.batch_size_per_gpu", 0, "config.train.batch_size_per_gpu=0 must be a positive integer"),
        ("train.total_batch_size", -4, "config.train.total_batch_size=-4 must be a positive integer"),
        ("train.total_samples_per_epoch", 200, "config.train.total_samples_per_epoch=200 is not a multiple"),
        ("sample.eval_batch_size", 0, "config.sample.eval_batch_size=0: must be >= 1"),
        ("train.learning_rate", 0.0, "config.train.learning_rate=0.0: must be > 0"),
        ("train.k_min", 0, "config.train.k_min=0"),
        ("train.uncheckpointed_steps", -1, "config.train.uncheckpointed_steps=-1: must be an int >= 0"),
        ("train.compile_memory_budget", 0.0, "config.train.compile_memory_budget=0.0: must be in (0, 1]"),
        ("train.compile_mode", "reduce-overhead", "must be one of default, max-autotune-no-cudagraphs"),
        ("train.compile_scope", "layers", "config.train.compile_scope='layers': must be one of model, blocks"),
    ],
)
def test_bad_values_name_their_key(key, value, needle):
    config = _with(CONFIGS.get_config("aesthetic"), key, value)
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




def test_settings_of_the_rewards_in_use_are_checked():
    config = CONFIGS.get_config("tiny")
    config.reward_fn = "object_count:1,compressibility:0.1"
    config.prompt_fn, config.eval_prompt_fn = "counting", "eval_counting"
    config.reward.object_count.query = "a photo"
    config.reward.object_count.threshold = 1.5
    config.reward.object_count.temperature = 0.0
    config.reward.compressibility.quality = 101
    config.reward.target = float("nan")
    with pytest.raises(ConfigError) as e:
        validate(config)
    message = str(e.value)
    for needle in (
        "config.reward.object_count.query='a photo': must contain '{}'",
        "config.reward.object_count.threshold=1.5: must be a probability in (0, 1)",
        "config.reward.object_count.temperature=0.0: must be > 0",
        "config.reward.compressibility.quality=101: must be a JPEG quality in [1, 100]",
        "config.reward.target=nan: must be a finite number",
    ):
        assert needle in message
    # Settings of rewards not in use are not checked.
    config.reward_fn, config.reward.target = "aesthetic", None
    config.prompt_fn, config.eval_prompt_fn = "simple_animals", "eval_simple_animals"
    validate(config)


def test_resume_from_a_folder_without_checkpoint(tmp_path):
    config = CONFIGS.get_config("tiny")
    config.resume_from = str(tmp_path)
    with pytest.raises(ConfigError, match=r"config.resume_from='.*' holds no complete checkpoint_N folder"):
        validate(config)
    (tmp_path / "checkpoint_4").mkdir()  # incomplete: no progress.json
    config.resume_from = str(tmp_path / "checkpoint_4")
    with pytest.raises(ConfigError, match=r"checkpoint_4' is not a complete checkpoint \(no progress.json\)"):
        validate(config)
    (tmp_path / "checkpoint_4" / "progress.json").write_text('{"step": 4, "epoch": 2}')
    validate(config)


def test_logdir_that_cannot_hold_run_folders(tmp_path):
    # Tests run as root, which may write anywhere: a regular file in the path fails for root too.
    (tmp_path / "afile").write_text("not a folder")
    config = CONFIGS.get_config("tiny")
    config.logdir = str(tmp_path / "afile" / "sub")
    with pytest.raises(ConfigError) as e:
        validate(config)
    message = str(e.value)
    assert f"config.logdir='{tmp_path}/afile/sub': run folders cannot be created there" in message
    assert f"'{tmp_path}/afile' is a file, not a folder" in message
    config.logdir = str(tmp_path / "new" / "logs")  # not there yet: created by the run
    validate(config)
    assert not (tmp_path / "new").exists()


def test_check_precision_on_cpu_and_on_gpus(monkeypatch):
    import torch

    from alignprop.validation import check_precision

    with pytest.raises(ConfigError, match=r"config.mixed_precision='fp16' needs a CUDA GPU; use 'no'"):
        check_precision("fp16", torch.device("cpu"))
    check_precision("bf16", torch.device("cpu"))
    check_precision("no", torch.device("cpu"))
    # The GPU branch, without a GPU: a card that has no bf16 (pre-Ampere) and one that has it.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    with pytest.raises(ConfigError, match=r"config.mixed_precision='bf16': this GPU has no bf16; use 'fp16'"):
        check_precision("bf16", torch.device("cuda", 0))
    check_precision("fp16", torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    check_precision("bf16", torch.device("cuda", 0))


def test_script_stops_before_loading_with_every_problem_listed(tmp_path):
    """Through the real script: resolution, guidance, logdir and an empty prompt file, one message, no traceback."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty.txt").write_text("# no prompts\n")
    result = run_script(
        [
            "scripts/train.py",
            "--config", "config/align_prop.py:tiny",
            "--config.sample.height=500",
            "--config.sample.guidance_scale=-1",
            f"--config.logdir={tmp_path}/afile/sub",
            f"--config.prompt_fn=from_file:{tmp_path}/empty.txt",
        ],
        timeout=120,
    )
    assert result.returncode != 0
    err = result.stderr
    for needle in (
        "config.sample.height=500: must be a positive multiple of 8 pixels",
        "config.sample.guidance_scale=-1.0: must be >= 0",
        f"config.prompt_fn='from_file:{tmp_path}/empty.txt': Prompt file '{tmp_path}/empty.txt' holds no prompts",
        f"config.logdir='{tmp_path}/afile/sub': run folders cannot be created there: '{tmp_path}/afile' is a file",
    ):
        assert needle in err, err[-3000:]
    assert "Traceback" not in err


def test_script_stops_on_precision_the_cpu_lacks(tmp_path):
    result = run_script(
        ["scripts/train.py", "--config", "config/align_prop.py:tiny", "--config.mixed_precision=fp16",
         f"--config.logdir={tmp_path}"],
        timeout=120,
    )
    assert result.returncode != 0
    assert "config.mixed_precision='fp16' needs a CUDA GPU; use 'no' (or 'bf16') on the CPU." in result.stderr
    assert "Traceback" not in result.stderr
    assert not os.listdir(tmp_path)  # stopped before the run folder was made


def test_random_weights_names_the_rewards_it_cannot_build():
    config = CONFIGS.get_config("aesthetic")
    config.random_weights = True
    validate(config, num_processes=1)  # aesthetic: supported
    config.reward_fn = "aesthetic:1,pickscore:1"
    with pytest.raises(ConfigError) as e:
        validate(config, num_processes=1)
    assert "config.random_weights=True" in str(e.value) and "pickscore" in str(e.value)
