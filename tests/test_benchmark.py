"""The benchmark script runs (tiny models on the CPU) and writes its JSON."""

import json

from conftest import run_script


def test_benchmark_smoke(tmp_path):
    result = run_script(
        ["scripts/benchmark.py", "--tiny", "--precision", "no", "--batch", "2", "--steps", "3", "--ks", "1,uniform",
         "--iters", "1", "--out", str(tmp_path)],
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.load(open(tmp_path / "bench_alignprop.json"))
    assert set(data["k"]) == {"1", "uniform"}
    assert all(row["finite"] and row["s_per_step_median"] > 0 for row in data["k"].values())
    assert data["unet_fwd_cfg_batch_tflop"] > 0
    assert "| K | s/step | peak GiB | images/s |" in result.stdout


def test_benchmark_names_a_precision_the_cpu_lacks(tmp_path):
    result = run_script(["scripts/benchmark.py", "--tiny", "--out", str(tmp_path)], timeout=300)
    assert result.returncode != 0
    assert "config.mixed_precision='fp16' needs a CUDA GPU" in result.stderr and "--precision" in result.stderr
    assert "Traceback" not in result.stderr
