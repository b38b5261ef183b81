"""The launch scripts run through `accelerate launch` with no accelerate config file present."""

import os
import sys

import pytest

from conftest import REPO

TINY_OVERRIDES = [
    "--config.pretrained.model=tiny", "--config.reward.aesthetic.clip_model=tiny", "--config.sample.num_steps=2",
    "--config.train.batch_size_per_gpu=2", "--config.train.total_batch_size=4",
    "--config.train.total_samples_per_epoch=4", "--config.num_epochs=1", "--config.sample.num_eval_samples=2",
    "--config.run_name=launch",
]


@pytest.mark.parametrize("script", ["aesthetic_k1.sh"])
def test_launch_script_runs_on_cpu(tmp_path, script):
    env = {
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
        "MIXED_PRECISION": "no",
        "HF_HOME": str(tmp_path / "hf"),  # no accelerate default config file in there
        "CUDA_VISIBLE_DEVICES": "",
    }
    import subprocess

    result = subprocess.run(
        ["bash", os.path.join(REPO, script), *TINY_OVERRIDES, f"--config.logdir={tmp_path}"],
        cwd=tmp_path, env={**os.environ, **env, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"},
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 process(es) x 2 per GPU x 2 accumulation = 4 samples" in result.stderr
    config = open(os.path.join(tmp_path, "launch", "config.json")).read()
    assert '"truncation": "fixed"' in config  # aesthetic_k1's setting reached the script


def test_all_four_scripts_exist_and_name_their_experiment():
    for name in ("aesthetic", "aesthetic_k1", "hps", "hps_k1"):
        text = open(os.path.join(REPO, f"{name}.sh")).read()
        assert f"launch.sh\" {name} " in text and os.access(os.path.join(REPO, f"{name}.sh"), os.X_OK)
