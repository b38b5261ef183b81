"""Shared fixtures: tiny random SD components (fp32, CPU, seeded) from the SD family's own tiny builder.

Two tiers: the default (fast) tier runs in-process; tests marked `slow` run the scripts end to end in
subprocesses (`python -m pytest -q tests -m slow`; `.ci/run` runs both). Under pytest-xdist (`-n auto`: one
worker per core) every worker, and every script it starts, runs one intra-op thread.
"""

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

from helpers import randomize_lora, tiny_components


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs of the scripts in subprocesses (the slow tier)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine two OpenMP threads can run 10x slower, not faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No network and an empty hub cache: what a machine without the weights sees (huggingface_hub reads
    HF_HUB_OFFLINE at import, so its constants are patched too; without that it tries the network and waits)."""
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


@pytest.fixture
def sd():
    """The SD 1.x/2.x family."""
    from alignprop import families

    return families.get("sd")


@pytest.fixture
def components(sd):
    """Tiny SD 1.x-shaped components, frozen, fp32 on the CPU."""
    return tiny_components(sd)


@pytest.fixture
def lora_components(components):
    """`components` with a LoRA (rank 4) whose factors are all nonzero."""
    from alignprop.lora import add_lora

    add_lora(components.denoiser, rank=4, alpha=4.0, targets=("to_q", "to_k", "to_v", "to_out.0"))
    randomize_lora(components.denoiser)
    return components
