"""End to end: `scripts/train.py` on the tiny config, offline, and everything it writes."""

import json
import os

import pytest
from PIL import Image

from conftest import run_script


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("logs")
    result = run_script(
        ["scripts/train.py", "--config", "config/align_prop.py:tiny", f"--config.logdir={logdir}",
         "--config.run_name=e2e"],
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return os.path.join(logdir, "e2e"), result


def test_run_folder_contents(tiny_run):
    run_dir, result = tiny_run
    config = json.load(open(os.path.join(run_dir, "config.json")))
    assert config["config"]["pretrained"]["model"] == "tiny"
    assert config["batch_plan"]["accumulation_steps"] == 2
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["step"] for r in records] == list(range(1, 9))  # 4 epochs x 2 optimizer steps
    for r in records:
        assert {"loss", "reward_mean", "reward_std", "k_mean", "seconds", "grad_norm"} <= r.keys()
        assert 1 <= r["k_mean"] <= 8 and r["seconds"] > 0 and r["skipped"] == 0
    assert os.path.getsize(os.path.join(run_dir, "pytorch_lora_weights.safetensors")) > 0
    # Training samples every config.log_image_freq=4 steps, evaluation grids, the reward plot.
    for name in ("eval_initial.png", "eval_final.png", "reward.png", "train_step4.png", "train_step8.png"):
        with Image.open(os.path.join(run_dir, "images", name)) as im:
            assert im.size[0] > 100 and im.size[1] > 100
    final = json.load(open(os.path.join(run_dir, "eval_final.json")))
    assert len(final["samples"]) == 4 and final["samples"][0]["prompt"] == "cheetah"
    assert final["per_reward"]["aesthetic"]["mean"] == pytest.approx(final["reward_mean"])
    # Checkpoints every 2 epochs, complete (with progress.json) and no leftover temporary folder.
    assert sorted(d for d in os.listdir(run_dir) if d.startswith("checkpoint")) == ["checkpoint_4", "checkpoint_8"]
    for ckpt in ("checkpoint_4", "checkpoint_8"):
        assert os.path.exists(os.path.join(run_dir, ckpt, "pytorch_lora_weights.safetensors"))
        assert json.load(open(os.path.join(run_dir, ckpt, "progress.json")))["step"] == int(ckpt.split("_")[1])
    assert "optimizer steps" in result.stderr  # the progress bar


def test_reward_rises(tiny_run):
    run_dir, _ = tiny_run
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    rewards = [r["reward_mean"] for r in records]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3
    initial = json.load(open(os.path.join(run_dir, "eval_initial.json")))["reward_mean"]
    final = json.load(open(os.path.join(run_dir, "eval_final.json")))["reward_mean"]
    # Same prompts, same initial noise: the trained LoRA scores higher than the base model.
    assert final > initial
