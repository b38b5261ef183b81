"""scripts/benchmark.py end to end in subprocesses, offline on the CPU (the slow tier; a module of its own, so that
pytest-xdist's --dist loadscope runs it beside test_scripts.py rather than after it)."""

import json

import pytest

from helpers import run_script

pytestmark = pytest.mark.slow


def test_benchmark_smoke(tmp_path):
    result = run_script(
        [
            "scripts/benchmark.py",
            "--tiny",
            "--precision",
            "no",
            "--batch",
            "2",
            "--steps",
            "3",
            "--ks",
            "1,uniform",
            "--iters",
            "1",
            "--out",
            str(tmp_path),
        ],
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.load(open(tmp_path / "bench_alignprop.json"))
    assert set(data["k"]) == {"1", "uniform"} and data["card"] == "cpu"
    assert all(row["finite"] and row["s_per_step_median"] > 0 for row in data["k"].values())
    assert data["denoiser_fwd_cfg_batch_tflop"] > 0
    assert "| K | s/step | peak GiB | images/s |" in result.stdout
    # The one-process DDP wrapper (--ddp): gloo on the CPU, the grad steps through DistributedDataParallel.
    result = run_script(["scripts/benchmark.py", "--tiny", "--precision", "no", "--batch", "2", "--steps", "2", "--ks",
                         "1", "--iters", "1", "--ddp", "--label", "ddp", "--out", str(tmp_path)], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = json.load(open(tmp_path / "bench_ddp.json"))
    assert ddp["ddp"] and ddp["k"]["1"]["finite"] and ddp["lora_identical_across_ranks"]
    # fp16 asked for on the CPU: a clear error before any model loads (auto resolves to fp32 here and runs).
    result = run_script(["scripts/benchmark.py", "--tiny", "--precision", "fp16", "--out", str(tmp_path)], timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "config.mixed_precision='fp16' needs a CUDA GPU" in result.stderr
    # --fp8-drift: without the float8 prefix, a clear error before any model loads; with it, the drift recorded.
    fp8 = ["scripts/benchmark.py", "--tiny", "--precision", "no", "--batch", "1", "--steps", "3", "--ks", "1",
           "--iters", "1", "--fp8-drift", "1", "--label", "fp8", "--out", str(tmp_path)]
    result = run_script(fp8, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--fp8-drift measures config.speed.fp8_prefix: add --config.speed.fp8_prefix=True" in result.stderr
    result = run_script([*fp8, "--config.speed.fp8_prefix=True"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    drift = json.load(open(tmp_path / "bench_fp8.json"))["fp8_drift"]
    assert drift["k"] == 1 and drift["fp8_vs_exact"]["images_max_abs_diff"] > 0
    assert "float8" in json.load(open(tmp_path / "bench_fp8.json"))["plan"]
    # --methods: one row per method (and per K for the methods with one), the penalty with +kl.
    result = run_script(["scripts/benchmark.py", "--tiny", "--precision", "no", "--batch", "1", "--steps", "3", "--ks",
                         "1,2", "--iters", "1", "--methods", "draft_k,refl,alignprop+kl", "--config.train.stop_last=2",
                         "--underflow", "1", "--label", "methods", "--out", str(tmp_path)], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.load(open(tmp_path / "bench_methods.json"))
    # fp32: no LoRA-B gradient entry underflows at any of the scales
    assert data["zero_lora_b_grad_fraction"] == {f"2^{e}": {"zero_fraction": 0.0, "finite": True}
                                                 for e in (16, 18, 20, 22, 24)}
    rows = data["k"]
    assert list(rows) == ["draft_k K=1", "draft_k K=2", "refl", "alignprop+kl K=1", "alignprop+kl K=2"]
    assert [(r["method"], r["kl_coeff"]) for r in rows.values()] == [
        ("draft_k", 0.0), ("draft_k", 0.0), ("refl", 0.0), ("alignprop", 0.1), ("alignprop", 0.1)]
    assert all(r["finite"] for r in rows.values())
    for entry, needle in (("refl+x", "--methods entry 'refl+x': give one of alignprop, draft_k, draft_lv, refl, "
                                     "drtune, each optionally followed by +kl"),
                          ("drtune", "--methods entry 'drtune': config.train.stop_last=10: must be in [1, "
                                     "sample.num_steps=3]")):
        result = run_script(["scripts/benchmark.py", "--tiny", "--precision", "no", "--steps", "3", "--methods", entry,
                             "--out", str(tmp_path)], timeout=300)
        assert result.returncode != 0 and needle in result.stderr and "Traceback" not in result.stderr
