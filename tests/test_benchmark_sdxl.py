"""The SDXL benchmark's parts in-process: the full-size models follow the config's family, and
scripts/naive_sdxl.py's loop (diffusers' SDXL pipeline loop with gradients, TRL's truncation) computes what
our rollout computes (the same images and LoRA gradients), so the two benchmarks compare like with like."""

import copy
import importlib.util
import os
import sys

import pytest
import torch

from alignprop import families, lora
from alignprop.rollout import Rollout, SampleSpec, grad_suffix
from alignprop.speed import Prepared
from helpers import REPO, SD_TARGETS, config, fixed_reward, lora_grads, randomize_lora, tiny_components

NUM_STEPS, GUIDANCE, SIZE = 4, 5.0, (32, 48)
PROMPTS = ["a photo of a cat", "an owl on a branch"]


@pytest.fixture(scope="module")
def naive(request):
    scripts = os.path.join(REPO, "scripts")
    sys.path.insert(0, scripts)  # the script imports its helpers from scripts/benchmark.py, as when run
    request.addfinalizer(lambda: sys.path.remove(scripts))
    spec = importlib.util.spec_from_file_location("alignprop_naive_sdxl", os.path.join(scripts, "naive_sdxl.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("spec,overrides,source", [
    ("config/align_prop.py:aesthetic", {}, "random:sd15"),  # the default benchmark, as before
    ("config/align_prop.py:aesthetic_sdxl", {}, "random:sdxl"),
    ("config/align_prop.py:aesthetic", {"model.family": "sdxl"}, "random:sdxl"),
    ("config/align_prop.py:aesthetic_sdxl", {"model.source": "tiny"}, "tiny"),
])
def test_benchmark_models_follow_the_family(naive, spec, overrides, source):
    import argparse

    cfg = config(spec, overrides)
    naive.full_size_defaults(cfg, argparse.Namespace(tiny=False), overrides)
    assert (cfg.model.source, cfg.reward.aesthetic.clip_model) == (source, "random")
    naive.full_size_defaults(cfg, argparse.Namespace(tiny=True), {})
    assert (cfg.model.source, cfg.reward.aesthetic.clip_model) == ("tiny", "tiny")


@pytest.fixture(scope="module")
def sdxl():
    return families.get("sdxl")


@pytest.fixture(scope="module")
def lora_components(sdxl):
    components = tiny_components(sdxl)
    lora.add_lora(components.denoiser, 4, 4.0, SD_TARGETS)
    randomize_lora(components.denoiser)
    return components


@pytest.mark.parametrize("k,eta", [(1, 0.0), (NUM_STEPS, 0.0), (2, 0.7)])
def test_naive_loop_computes_our_images_and_gradients(naive, sdxl, lora_components, k, eta):
    components = copy.deepcopy(lora_components)
    rollout = Rollout(sdxl, components, SampleSpec(NUM_STEPS, GUIDANCE, 0.0, eta, *SIZE),
                      Prepared(components.denoiser, components.vae))
    x_T = rollout.initial_latents(2, torch.Generator().manual_seed(0))
    ours = rollout(rollout.encode(PROMPTS), x_T, grad_suffix(NUM_STEPS, k), torch.Generator().manual_seed(3))
    ours_grads = lora_grads(components.denoiser, fixed_reward(ours).sum())
    pipe = sdxl.pipeline(components)
    pipe.unet.enable_gradient_checkpointing()
    theirs = naive.naive_images(pipe, PROMPTS, x_T, NUM_STEPS, GUIDANCE, k, *SIZE, eta,
                                torch.Generator().manual_seed(3))
    theirs_grads = lora_grads(components.denoiser, fixed_reward(theirs).sum())
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert sum(g.abs().sum() for g in ours_grads.values()) > 0
    for name, grad in ours_grads.items():
        # fp32, the same operations in the same order but for the truncation (detached outputs vs no graph)
        # and the checkpointed blocks: round-off only.
        torch.testing.assert_close(theirs_grads[name], grad, rtol=2e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
