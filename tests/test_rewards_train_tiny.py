"""End to end: `scripts/train.py` on the tiny config, offline on the CPU, for every new reward and a weighted sum."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# reward_fn -> (extra flags, info keys that must be logged as reward/<key>)
CASES = {
    "hps": ([], []),
    "hps_v21": ([], []),
    "pickscore": ([], []),
    "clipscore": ([], []),
    "compressibility": ([], ["jpeg_kb"]),
    "incompressibility": ([], ["jpeg_kb"]),
    "object_count": (
        ["--config.prompt_fn=counting", "--config.eval_prompt_fn=eval_counting"],
        ["soft_count", "count_error", "count_exact"],
    ),
    "aesthetic:1.0,hps:0.5,compressibility:-0.1": ([], ["aesthetic", "hps", "compressibility", "compressibility/jpeg_kb"]),
}


@pytest.mark.parametrize("reward_fn", list(CASES))
def test_tiny_training_run(reward_fn, tmp_path):
    flags, info_keys = CASES[reward_fn]
    run_name = "run"
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    command = [
        sys.executable,
        "scripts/train.py",
        "--config=config/align_prop.py:tiny",
        f"--config.reward_fn={reward_fn}",
        "--config.num_epochs=1",
        # One optimizer step of two micro-batches and two eval images: every stage runs, fast.
        "--config.train.total_samples_per_epoch=4",
        "--config.sample.num_eval_samples=2",
        f"--config.run_name={run_name}",
        f"--config.logdir={tmp_path}",
        *flags,
    ]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    run = tmp_path / run_name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1
    record = records[0]
    assert math.isfinite(record["reward_mean"]) and math.isfinite(record["loss"]) and record["nonfinite"] == 0
    for key in info_keys:
        assert math.isfinite(record[f"reward/{key}"]), key
    final = json.loads((run / "eval_final.json").read_text())
    assert len(final["samples"]) == 2 and all(math.isfinite(s["reward"]) for s in final["samples"])
    assert (run / "pytorch_lora_weights.safetensors").exists()
