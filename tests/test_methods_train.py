"""Every method trains end to end on the tiny config (in-process, the slow tier), with the penalty and held-out
rewards on the evaluation images."""

import json
import math

import pytest

from helpers import config, train_in_process

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("overrides", [
    {"train.method": "draft_k", "train.truncation": "fixed", "train.k": 2},
    {"train.method": "draft_lv", "train.lv_copies": 2},
    {"train.method": "refl"},
    {"train.method": "drtune", "train.drtune_k": 2},
    {"train.kl_coeff": 0.5, "eval_rewards": "clipscore,compressibility"},
], ids=["draft_k", "draft_lv", "refl", "drtune", "kl_heldout"])
def test_tiny_training_run(overrides, tmp_path, one_thread):
    train_in_process(config(overrides={"num_epochs": 1, "train.total_samples_per_epoch": 4,
                                       "sample.num_eval_samples": 2, "run_name": "run", "logdir": str(tmp_path),
                                       **overrides}))
    run = tmp_path / "run"
    (record,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(record["loss"]) and record["nonfinite"] == 0 and record["grad_norm"] > 0
    method = overrides.get("train.method", "alignprop")
    expected_k = {"draft_k": 2, "draft_lv": 2, "refl": 1, "drtune": 2}.get(method)
    if expected_k:
        assert record["k_mean"] == expected_k
    final = json.loads((run / "eval_final.json").read_text())
    if "train.kl_coeff" in overrides:
        assert record["kl"] >= 0 and math.isfinite(record["kl"])
        assert {"heldout/clipscore", "heldout/compressibility"} <= set(final["per_reward"])
    assert (run / "pytorch_lora_weights.safetensors").exists()
