"""Helpers of the tests (imported by the test modules and conftest.py; no test imports another test module)."""

import json
import os
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_ASSETS = os.path.join(os.path.dirname(REPO), "shared", "assets")
TINY = os.path.join("config", "align_prop.py") + ":tiny"
SD_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def tiny_components(family=None, variant=None, seed=0, dtype=torch.float32):
    """Tiny components of `family` (default SD; `variant` default the family's first), frozen and cast on the CPU."""
    from alignprop import families
    from alignprop.families import Source

    family = family or families.get("sd")
    components = family.load(Source("tiny", variant or next(iter(family.tiny_variants))), seed=seed)
    family.freeze_and_cast(components, torch.device("cpu"), dtype)
    return components


def config(spec=TINY, overrides=None):
    """A config through the project's one loader, with `overrides` {"train.k": 3, ...} applied."""
    from alignprop import config as configs

    return configs.load(os.path.join(REPO, spec), overrides)


def randomize_lora(module, seed=0, scale=0.05):
    """Give every LoRA factor nonzero values (gaussian init leaves lora_B at zero, so lora_A gets no grad)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def run_script(args, cwd=REPO, timeout=600, env=None):
    """Run a script of the repo in a subprocess with this interpreter, offline; returns CompletedProcess."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    full_env["PYTHONPATH"] = REPO + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def lora_grads(module, loss):
    """name -> gradient of `loss` w.r.t. every trainable parameter of `module` (zeros where unused)."""
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {n: (torch.zeros_like(p) if g is None else g) for (n, p), g in zip(params.items(), grads)}


def fixed_reward(images):
    """A fixed differentiable 'reward' (random linear functional of the pixels), independent of reward models."""
    w = torch.randn(images.shape[1:], generator=torch.Generator().manual_seed(7))
    return (images * w).flatten(1).sum(1)


def make_reward(spec="aesthetic", overrides=None, base=TINY):
    """`rewards.build` of the reward spec on the CPU in fp32, with the settings of the tiny config (or `base`)
    and `overrides`; the function returns (total, components, info)."""
    from alignprop import rewards

    cfg = config(base, overrides)
    return rewards.build(rewards.parse(spec), cfg.reward, cfg.seed, torch.device("cpu"), torch.float32)


def train_in_process(cfg):
    """`scripts/train.py`'s train(config) in this process (accelerate's process state reset first)."""
    import importlib.util

    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    spec = importlib.util.spec_from_file_location("alignprop_train_script", os.path.join(REPO, "scripts", "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.train(cfg)


def save_tiny_lora(path, family=None, seed=1, rank=4, alpha=8.0):
    """A random ("trained") LoRA of the tiny SD model written as training writes it; returns the folder."""
    from alignprop import families, lora

    family = family or families.get("sd")
    denoiser = tiny_components(family).denoiser
    lora_config = lora.add_lora(denoiser, rank, alpha, SD_TARGETS)
    randomize_lora(denoiser, seed=seed, scale=0.2)
    lora.save_lora(family, denoiser, lora_config, str(path))
    return str(path)


TRAIN = ["scripts/train.py", "--config", TINY]


def records(run_dir):
    """The run's metrics.jsonl, one dict per optimizer step."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train(logdir, *overrides, timeout=600, env=None):
    """scripts/train.py on the tiny config in a subprocess; asserts it exits 0."""
    result = run_script([*TRAIN, f"--config.logdir={logdir}", *overrides], timeout=timeout, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return result
