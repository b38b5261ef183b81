"""The tiny SDXL run trains end to end, square and non-square, offline on the CPU (in-process, slow tier)."""

import json
import math

import pytest
from PIL import Image

from helpers import config, train_in_process

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("size", [None, (32, 48)])
def test_tiny_sdxl_run_trains(tmp_path, one_thread, size):
    overrides = {"run_name": "run", "logdir": str(tmp_path)}
    if size:
        overrides.update({"sample.height": size[0], "sample.width": size[1]})
    train_in_process(config("config/align_prop.py:tiny_sdxl", overrides))
    run = tmp_path / "run"
    saved = json.loads((run / "config.json").read_text())["config"]
    assert (saved["model"]["family"], saved["model"]["source"]) == ("sdxl", "tiny:sdxl")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 8 and all(r["nonfinite"] == 0 and r["grad_norm"] > 0 for r in records)
    initial = json.loads((run / "eval_initial.json").read_text())["reward_mean"]
    final = json.loads((run / "eval_final.json").read_text())["reward_mean"]
    assert final > initial  # same prompts, same noise: the trained LoRA scores higher
    assert (run / "pytorch_lora_weights.safetensors").exists()
    # The 4 evaluation images' grid: 2 columns of tiles as wide as the images, upscaled to >= 128 px.
    width = size[1] if size else 32
    with Image.open(run / "images" / "eval_final.png") as grid:
        assert grid.size[0] == 2 * width * math.ceil(128 / width)
