"""Mixing in ΔW space: set_adapters gives c·ΔW and (1−c)·ΔW₁ + c·ΔW₂; factor-space mixing does not."""

import copy
import json
import os

import pytest
import torch

from alignprop import checkpoints, mixing, models
from alignprop.tiny import tiny_unet_config
from conftest import randomize_lora

pytestmark = pytest.mark.usefixtures("one_thread")


# alpha != rank: a loader that ignored the saved metadata would get the scale wrong.
RANK, ALPHA = 4, 8.0


def tiny_unet():
    """The tiny UNet of `build_tiny_components(seed=0)`, without building the rest."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**tiny_unet_config()).eval().requires_grad_(False)


def trained_unet(seed):
    """A tiny UNet with a random ("trained") LoRA as adapter 'default'."""
    unet = tiny_unet()
    config = models.add_lora(unet, rank=RANK, alpha=ALPHA)
    randomize_lora(unet, seed=seed, scale=0.2)
    return unet, config


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """Two LoRAs saved as a run folder (final file + checkpoint_2) and a checkpoint folder; their UNets."""
    root = tmp_path_factory.mktemp("loras")
    out = {}
    for key, seed in (("a", 1), ("b", 2)):
        unet, config = trained_unet(seed)
        run = root / f"run_{key}"
        checkpoint = run / "checkpoint_2"
        os.makedirs(checkpoint)
        checkpoints.save_lora(unet, config, str(run))
        checkpoints.save_lora(unet, config, str(checkpoint))
        (checkpoint / checkpoints.PROGRESS).write_text(json.dumps({"step": 2, "epoch": 1}))
        out[key] = dict(unet=unet, run=str(run), checkpoint=str(checkpoint))
    return out


def lora_layers(unet):
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in unet.named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def effective_deltas(unet):
    """Layer name -> W_eff − W of every LoRA Linear, measured as a black box: layer(I) − base_layer(I)."""
    out = {}
    for name, layer in lora_layers(unet).items():
        eye = torch.eye(layer.base_layer.in_features)
        out[name] = (layer(eye) - layer.base_layer(eye)).T
    return out


@torch.no_grad()
def scale_factors(unet, c):
    """The original code's mixing of a LoRA with the base model: A and B each multiplied by c."""
    for name, p in unet.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            p.mul_(c)


def assert_deltas_close(actual, expected, atol=1e-6):
    assert actual.keys() == expected.keys() and len(actual) >= 8
    for name in actual:
        torch.testing.assert_close(actual[name], expected[name], atol=atol, rtol=1e-5, msg=name)


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_one_lora_with_the_base_model_is_c_times_delta_and_factor_space_is_c_squared(loras):
    full = effective_deltas(loras["a"]["unet"])
    assert max(d.abs().max().item() for d in full.values()) > 1e-2  # the LoRA is not ~zero

    unet = tiny_unet()
    mixing.load_lora(unet, loras["a"]["run"], "a")
    mixing.set_mix(unet, ["a"], [1.0])
    assert_deltas_close(effective_deltas(unet), full)  # loaded with the right scale (alpha / rank)
    for c in (0.0, 0.3, 0.5, 0.75):
        mixing.set_mix(unet, ["a"], [c])
        assert_deltas_close(effective_deltas(unet), {k: c * d for k, d in full.items()})

    # Counter-example (REFERENCE.md bug #5): interpolating A and B with the base model's zero factors.
    c = 0.5
    factor_mixed = copy.deepcopy(loras["a"]["unet"])
    scale_factors(factor_mixed, c)
    factor = effective_deltas(factor_mixed)
    assert_deltas_close(factor, {k: c**2 * d for k, d in full.items()})
    assert max_diff(factor, {k: c * d for k, d in full.items()}) > 1e-3


def test_two_loras_mix_without_cross_terms_and_factor_space_has_them(loras):
    delta_a, delta_b = effective_deltas(loras["a"]["unet"]), effective_deltas(loras["b"]["unet"])
    unet = tiny_unet()
    mixing.load_lora(unet, loras["a"]["checkpoint"], "a")
    mixing.load_lora(unet, loras["b"]["run"] + "/" + checkpoints.LORA_WEIGHTS, "b")
    for c in (0.0, 0.25, 0.5, 1.0):
        mixing.set_mix(unet, ["a", "b"], [1 - c, c])
        expected = {k: (1 - c) * delta_a[k] + c * delta_b[k] for k in delta_a}
        assert_deltas_close(effective_deltas(unet), expected)

    # Factor space: A = (1−c)A₁ + cA₂, B = (1−c)B₁ + cB₂ gives (1−c)²ΔW₁ + c²ΔW₂ + cross terms.
    c = 0.5
    factor_mixed = copy.deepcopy(loras["a"]["unet"])
    params_b = dict(loras["b"]["unet"].named_parameters())
    with torch.no_grad():
        for name, p in factor_mixed.named_parameters():
            if "lora_" in name:
                p.mul_(1 - c).add_(c * params_b[name])
    layers_a, layers_b = lora_layers(loras["a"]["unet"]), lora_layers(loras["b"]["unet"])
    scale = ALPHA / RANK
    with torch.no_grad():
        cross = {
            k: scale * (la.lora_B["default"].weight @ lb.lora_A["default"].weight
                        + lb.lora_B["default"].weight @ la.lora_A["default"].weight)
            for (k, la), lb in zip(layers_a.items(), layers_b.values())
        }
    factor = effective_deltas(factor_mixed)
    assert_deltas_close(
        factor, {k: (1 - c) ** 2 * delta_a[k] + c**2 * delta_b[k] + c * (1 - c) * cross[k] for k in delta_a}
    )
    assert max_diff(factor, {k: (1 - c) * delta_a[k] + c * delta_b[k] for k in delta_a}) > 1e-3


@torch.no_grad()
def test_pipeline_mixing_end_points_match_base_and_lora_unet(loras):
    from diffusers import StableDiffusionPipeline

    from alignprop.tiny import build_tiny_components

    pipe = StableDiffusionPipeline(
        **build_tiny_components(seed=0), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    x, emb = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)
    base = pipe.unet(x, 10, encoder_hidden_states=emb).sample
    mixing.load_lora(pipe, loras["a"]["run"], "a")
    mixing.set_mix(pipe, ["a"], [0.0])
    assert torch.equal(pipe.unet(x, 10, encoder_hidden_states=emb).sample, base)
    mixing.set_mix(pipe, ["a"], [1.0])
    trained = loras["a"]["unet"](x, 10, encoder_hidden_states=emb).sample
    torch.testing.assert_close(pipe.unet(x, 10, encoder_hidden_states=emb).sample, trained, atol=1e-5, rtol=1e-5)


def test_lora_file_resolves_run_checkpoint_and_file_and_names_bad_paths(loras, tmp_path):
    run, checkpoint = loras["a"]["run"], loras["a"]["checkpoint"]
    assert mixing.lora_file(run) == os.path.join(run, checkpoints.LORA_WEIGHTS)
    assert mixing.lora_file(checkpoint) == os.path.join(checkpoint, checkpoints.LORA_WEIGHTS)
    file = os.path.join(run, checkpoints.LORA_WEIGHTS)
    assert mixing.lora_file(file) == file

    missing = str(tmp_path / "no_such_run")
    with pytest.raises(mixing.LoRAPathError, match="no_such_run.*does not exist"):
        mixing.lora_file(missing)
    unfinished = tmp_path / "unfinished"
    os.makedirs(unfinished / "checkpoint_4")
    (unfinished / "checkpoint_4" / checkpoints.PROGRESS).write_text("{}")
    with pytest.raises(mixing.LoRAPathError, match="unfinished.*latest checkpoint is .*checkpoint_4"):
        mixing.lora_file(str(unfinished))


def test_lora_without_unet_prefix_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"down.lora_A.weight": torch.zeros(4, 32)}, str(tmp_path / "adapter.safetensors"))
    with pytest.raises(ValueError, match="no 'unet.'-prefixed keys"):
        mixing.load_lora(tiny_unet(), str(tmp_path / "adapter.safetensors"), "a")


def test_parse_lora_spec_and_soup_weights():
    assert mixing.parse_lora_spec("runs/a:0.5") == ("runs/a", 0.5)
    assert mixing.parse_lora_spec("runs/a") == ("runs/a", 1.0)
    assert mixing.parse_lora_spec("runs/a:b") == ("runs/a:b", 1.0)
    assert mixing.parse_lora_spec("runs/a:-1") == ("runs/a", -1.0)
    with pytest.raises(ValueError, match="finite"):
        mixing.parse_lora_spec("runs/a:nan")
    assert mixing.soup_weights(0.25, two_loras=False) == [0.25]
    assert mixing.soup_weights(0.25, two_loras=True) == [0.25, 0.75]
