"""Shared fixtures: tiny random SD components (fp32, CPU, seeded) from the one tiny builder."""

import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_ASSETS = os.path.join(os.path.dirname(REPO), "shared", "assets")


@pytest.fixture(autouse=True)
def _seed_and_threads():
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
def components():
    from alignprop.models import Components, freeze_and_cast
    from alignprop.tiny import build_tiny_components

    comps = Components(**build_tiny_components(seed=0))
    freeze_and_cast(comps, torch.device("cpu"), torch.float32)
    return comps


def randomize_lora(unet, seed=0, scale=0.05):
    """Give every LoRA factor nonzero values (gaussian init leaves lora_B at zero, so lora_A gets no grad)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture
def lora_components(components):
    from alignprop.models import add_lora

    add_lora(components.unet, rank=4, alpha=4.0)
    randomize_lora(components.unet)
    return components


def run_script(args, cwd=REPO, timeout=600, env=None):
    """Run a script of the repo in a subprocess with this interpreter; returns CompletedProcess."""
    import subprocess

    full_env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    full_env["PYTHONPATH"] = REPO + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )
