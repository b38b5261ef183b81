"""Every reward (and a weighted sum) trains end to end on the tiny config, offline on the CPU (in-process)."""

import json
import math

import pytest

from helpers import config, train_in_process

pytestmark = pytest.mark.slow

# reward_fn -> (overrides, info keys that must be logged as reward/<key>)
CASES = {
    "hps": ({}, ["hps"]),
    "hps_v21": ({}, ["hps_v21"]),
    "pickscore": ({}, ["pickscore"]),
    "clipscore": ({}, ["clipscore", "clipscore/clip_score"]),
    "imagereward": ({}, ["imagereward"]),
    "mps": ({}, ["mps"]),
    "hpsv3": ({}, ["hpsv3", "hpsv3/sigma"]),
    "compressibility": ({}, ["compressibility", "compressibility/jpeg_kb"]),
    "incompressibility": ({}, ["incompressibility/jpeg_kb"]),
    "object_count": ({"prompt_fn": "counting", "eval_prompt_fn": "eval_counting"},
                     ["object_count/soft_count", "object_count/count_error", "object_count/count_exact"]),
    "aesthetic:1.0,hps:0.5,compressibility:-0.1": ({}, ["aesthetic", "hps", "compressibility",
                                                        "compressibility/jpeg_kb"]),
}


@pytest.mark.parametrize("reward_fn", list(CASES))
def test_tiny_training_run(reward_fn, tmp_path, one_thread):
    overrides, info_keys = CASES[reward_fn]
    # One optimizer step of two micro-batches and two eval images: every stage runs, fast.
    train_in_process(config(overrides={
        "reward_fn": reward_fn, "num_epochs": 1, "train.total_samples_per_epoch": 4, "sample.num_eval_samples": 2,
        "run_name": "run", "logdir": str(tmp_path), **overrides}))
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1
    record = records[0]
    assert math.isfinite(record["reward_mean"]) and math.isfinite(record["loss"]) and record["nonfinite"] == 0
    for key in info_keys:
        assert math.isfinite(record[f"reward/{key}"]), key
    final = json.loads((run / "eval_final.json").read_text())
    assert len(final["samples"]) == 2 and all(math.isfinite(s["reward"]) for s in final["samples"])
    assert (run / "pytorch_lora_weights.safetensors").exists()


def test_tiny_sd2_v_prediction_run_trains(tmp_path, one_thread):
    """SD 2.x end to end: tiny SD 2.x-shaped models predicting v, guidance rescale, the whole tiny schedule."""
    train_in_process(config("config/align_prop.py:tiny_sd21", {"run_name": "sd21", "logdir": str(tmp_path)}))
    run = tmp_path / "sd21"
    saved = json.loads((run / "config.json").read_text())["config"]
    assert saved["model"]["source"] == "tiny:sd2" and saved["sample"]["guidance_rescale"] == 0.7
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 8 and all(r["nonfinite"] == 0 and r["grad_norm"] > 0 for r in records)
    initial = json.loads((run / "eval_initial.json").read_text())["reward_mean"]
    final = json.loads((run / "eval_final.json").read_text())["reward_mean"]
    assert final > initial  # same prompts, same noise: the trained LoRA scores higher
