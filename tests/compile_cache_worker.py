"""Worker for tests/test_speed_cache.py: compile a small module with inductor after loading the compile cache
file (if any), run it forward and backward, save the cache file, print the compile report (timers and cache
counters)."""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from alignprop import profiling, speed  # noqa: E402


def main(path):
    speed.load_compile_cache(path)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    model.compile(backend="inductor", dynamic=False)
    model(torch.randn(4, 16, requires_grad=True)).sum().backward()
    speed.save_compile_cache(path)
    print(json.dumps(profiling.compile_report()))


if __name__ == "__main__":
    main(sys.argv[1])
