"""User errors: one base class; scripts/train.py shows their message alone, without a traceback."""

import pytest
import torch

from alignprop.errors import ConfigError, UserError
from alignprop.families.loading import ModelLoadError
from alignprop.lora import LoRAFileError, LoRAPathError
from alignprop.plan import BatchPlanError
from alignprop.prompts import PromptError
from alignprop.rewards import RewardInputError, RewardSpecError
from alignprop.rewards.aesthetic import AestheticMLP
from alignprop.rewards.loading import BadWeightsError, WeightsNotFoundError
from alignprop.launch import LaunchError
from alignprop.runs import RunFolderError
from alignprop.tracking import TrackerError
from helpers import run_script


@pytest.mark.parametrize(
    "cls, also",
    [(ConfigError, ValueError), (BatchPlanError, ValueError), (PromptError, ValueError),
     (RewardSpecError, ValueError), (ModelLoadError, RuntimeError), (WeightsNotFoundError, RuntimeError),
     (BadWeightsError, RuntimeError), (RunFolderError, OSError), (LoRAPathError, FileNotFoundError),
     (LoRAFileError, ValueError), (RewardInputError, ValueError), (LaunchError, RuntimeError),
     (TrackerError, RuntimeError)],
)
def test_every_user_error_shares_the_base_and_keeps_its_builtin_type(cls, also):
    assert issubclass(cls, UserError) and issubclass(cls, also)


def _assert_one_message(result, *needles):
    assert result.returncode != 0
    err = result.stderr
    for needle in needles:
        assert needle in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]


def _train_tiny(tmp_path, override):
    """scripts/train.py on the tiny config with one --config override, its run folders under tmp_path."""
    return run_script(
        ["scripts/train.py", "--config", "config/align_prop.py:tiny", override, f"--config.logdir={tmp_path / 'logs'}"],
        timeout=120,
    )


@pytest.mark.slow
def test_script_shows_a_broken_sd_checkpoint_as_one_message(tmp_path):
    path = tmp_path / "sd15.safetensors"
    path.write_bytes(b"\x00" * 4096)  # e.g. a download that stopped
    _assert_one_message(
        _train_tiny(tmp_path, f"--config.model.source={path}"),
        f"config.model.source='{path}' is not a usable Stable Diffusion 1.x/2.x checkpoint",
        "the file (4096 bytes) cannot be read", "point `config.model.source` at a diffusers folder or a hub id",
    )


@pytest.mark.slow
def test_script_shows_a_truncated_reward_file_as_one_message(tmp_path):
    path = tmp_path / "aesthetic-model.pth"
    torch.save(AestheticMLP(32).state_dict(), path)
    path.write_bytes(path.read_bytes()[:1000])
    _assert_one_message(
        _train_tiny(tmp_path, f"--config.reward.aesthetic.mlp_path={path}"),
        f"Aesthetic MLP weights '{path}' (1000 bytes) could not be read: the file is corrupt, truncated",
        "Point config.reward.aesthetic.mlp_path at a good copy of the LAION MLP",
    )
