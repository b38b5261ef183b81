"""The compile cache: compiled kernels saved after a run's first step and loaded by the next run of the same shape."""

import json
import os

import pytest

from alignprop import speed
from helpers import REPO, config, run_script


def test_the_cache_file_follows_the_run_shape(monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the cache is for compiled GPU runs
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    base = config("config/align_prop.py:aesthetic")
    path = speed.compile_cache_file(base)
    assert path.startswith(str(tmp_path / "alignprop" / "compile")) and path.endswith(".bin")
    assert speed.compile_cache_file(config("config/align_prop.py:aesthetic", {"train.learning_rate": 5e-4})) == path
    for change in ({"train.batch_size_per_gpu": 2}, {"sample.height": 768}, {"mixed_precision": "bf16"},
                   {"speed.checkpoint_blocks": False}):
        assert speed.compile_cache_file(config("config/align_prop.py:aesthetic", change)) != path, change
    assert speed.compile_cache_file(config("config/align_prop.py:aesthetic", {"speed.compile_cache": "off"})) is None
    assert speed.compile_cache_file(config("config/align_prop.py:aesthetic", {"speed.compile_cache": "/x/c.bin"})) \
        == "/x/c.bin"
    assert speed.compile_cache_file(config()) is None  # the tiny config does not compile


@pytest.mark.slow
def test_a_second_process_starts_warm(tmp_path):
    """Two processes with empty inductor caches of their own: the second loads the first's file and hits."""
    path = str(tmp_path / "cache.bin")
    counts = []
    for name in ("cold", "warm"):
        env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / name), "OMP_NUM_THREADS": "1"}
        result = run_script([os.path.join(REPO, "tests", "compile_cache_worker.py"), path], timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        counts.append(json.loads(result.stdout.strip().splitlines()[-1]))
        assert os.path.getsize(path) > 0
    cold, warm = (report["caches"] for report in counts)
    assert cold.get("inductor/fxgraph_cache_hit", 0) == 0 and cold.get("inductor/fxgraph_cache_miss", 0) > 0
    assert warm.get("inductor/fxgraph_cache_hit", 0) >= 2 and warm.get("inductor/fxgraph_cache_miss", 0) == 0  # fwd, bwd
    # and AOTAutograd's cache: the warm process does not trace the joint forward and backward again
    assert cold.get("aot_autograd/autograd_cache_miss", 0) == 1 and warm.get("aot_autograd/autograd_cache_hit", 0) == 1
    assert "aot_trace_joint_graph" not in counts[1]["seconds"] and counts[0]["seconds"]["aot_trace_joint_graph"] > 0
