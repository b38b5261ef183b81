"""Using LoRAs: mixing in ΔW space (set_adapters gives c·ΔW and c·ΔW_A + (1−c)·ΔW_B; factor-space mixing does
not), the soup evaluation, and generation through diffusers' own pipeline."""

import copy

import numpy as np
import pytest
import torch

from alignprop import lora, mixing
from alignprop.evaluation import evaluate, reward_columns, summarize
from alignprop.rewards import TOTAL
from helpers import SD_TARGETS, randomize_lora, tiny_components

pytestmark = pytest.mark.usefixtures("one_thread")

# alpha != rank: a loader that ignored the saved metadata would get the scale wrong.
RANK, ALPHA = 4, 8.0
PROMPTS = ["a photo of a cat", "an owl", "three apples"]
SETTINGS = dict(seed=7, num_steps=3, guidance_scale=7.5)


def trained_unet(sd, seed, rank=RANK, alpha=ALPHA):
    """A tiny UNet with a random ("trained") LoRA as adapter 'default'."""
    unet = tiny_components(sd).denoiser
    config = lora.add_lora(unet, rank, alpha, SD_TARGETS)
    randomize_lora(unet, seed=seed, scale=0.2)
    return unet, config


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """LoRAs saved as run folders (final file + checkpoint_2) and their UNets: a and b of one rank, c of another."""
    from alignprop import families

    sd = families.get("sd")
    root = tmp_path_factory.mktemp("loras")
    out = {}
    for key, seed, rank, alpha in (("a", 1, RANK, ALPHA), ("b", 2, RANK, ALPHA), ("c", 4, 2, 2.0)):
        unet, config = trained_unet(sd, seed, rank, alpha)
        run = root / f"run_{key}"
        lora.save_lora(sd, unet, config, str(run))
        lora.save_lora(sd, unet, config, str(run / "checkpoint_2"))
        out[key] = dict(unet=unet, run=str(run), checkpoint=str(run / "checkpoint_2"))
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


def test_one_lora_with_the_base_model_is_c_times_delta_and_factor_space_is_c_squared(loras, sd):
    full = effective_deltas(loras["a"]["unet"])
    assert max(d.abs().max().item() for d in full.values()) > 1e-2  # the LoRA is not ~zero

    unet = tiny_components(sd).denoiser
    lora.load_adapter(unet, sd, loras["a"]["run"], "a")
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


def test_two_loras_mix_without_cross_terms_and_factor_space_has_them(loras, sd):
    delta_a, delta_b = effective_deltas(loras["a"]["unet"]), effective_deltas(loras["b"]["unet"])
    unet = tiny_components(sd).denoiser
    lora.load_adapter(unet, sd, loras["a"]["checkpoint"], "a")
    lora.load_adapter(unet, sd, loras["b"]["run"] + "/" + lora.LORA_WEIGHTS, "b")
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
def test_pipeline_mixing_end_points_match_base_and_lora_unet(loras, sd):
    components = tiny_components(sd)
    pipe = sd.pipeline(components)
    x, emb = torch.randn(2, 4, 16, 16), sd.encode(components, PROMPTS[:2])["encoder_hidden_states"]
    base = pipe.unet(x, 10, encoder_hidden_states=emb).sample
    mixing.load_mix(pipe.unet, sd, [(loras["a"]["run"], 0.0)])
    assert torch.equal(pipe.unet(x, 10, encoder_hidden_states=emb).sample, base)
    mixing.set_mix(pipe.unet, ["lora_0"], [1.0])
    trained = loras["a"]["unet"](x, 10, encoder_hidden_states=emb).sample
    torch.testing.assert_close(pipe.unet(x, 10, encoder_hidden_states=emb).sample, trained, atol=1e-5, rtol=1e-5)


def test_parse_lora_spec_soup_weights_and_coefficients():
    from alignprop.errors import ConfigError

    assert mixing.parse_lora_spec("runs/a:0.5") == ("runs/a", 0.5)
    assert mixing.parse_lora_spec("runs/a") == ("runs/a", 1.0)
    assert mixing.parse_lora_spec("runs/a:b") == ("runs/a:b", 1.0)
    assert mixing.parse_lora_spec("runs/a:-1") == ("runs/a", -1.0)
    with pytest.raises(ConfigError, match="finite"):
        mixing.parse_lora_spec("runs/a:nan")
    assert mixing.soup_weights(0.25, two_loras=False) == [0.25]
    assert mixing.soup_weights(0.25, two_loras=True) == [0.25, 0.75]
    assert mixing.parse_coefficients(["0", "0.5", "1.5", "-0.25"]) == [0.0, 0.5, 1.5, -0.25]
    for bad in (["0", "half"], ["inf"], []):
        with pytest.raises(ConfigError, match="--coefficients"):
            mixing.parse_coefficients(bad)


def test_reward_columns_and_summary():
    def reward_fn(images, prompts, metadata):
        n = len(images)
        return torch.full((n,), 10.0), {"aesthetic": torch.full((n,), 5.0), "hps": torch.full((n,), 0.25)}, {}

    rewards = reward_columns(reward_fn, [TOTAL, "aesthetic", "hps"])(torch.zeros(3, 3, 8, 8), ["a"] * 3, [{}] * 3)
    assert torch.equal(rewards, torch.tensor([[10.0, 5.0, 0.25]] * 3))
    assert reward_columns(reward_fn, ["hps"])(torch.zeros(2, 3, 8, 8), ["a"] * 2, [{}] * 2).shape == (2, 1)
    summary = summarize(torch.tensor([[1.0, 2.0], [3.0, 2.0]]), ["total", "hps"])
    assert summary == {"total": {"mean": 2.0, "std": pytest.approx(2**0.5)}, "hps": {"mean": 2.0, "std": 0.0}}
    assert summarize(torch.tensor([[1.0]]), ["x"]) == {"x": {"mean": 1.0, "std": 0.0}}


def test_soup_with_the_base_model_goes_from_base_to_lora(sd, tmp_path):
    """Without LoRA B: c = 0 evaluates as the base model, c = 1 as the LoRA, through the soup's loader."""
    from alignprop.prompts import EVAL_SIMPLE_ANIMALS
    from alignprop.rollout import Rollout, SampleSpec
    from alignprop.speed import Prepared

    def brightness(images, prompts, metadata):
        return images.mean(dim=(1, 2, 3))[:, None]

    items = [(p, {}) for p in EVAL_SIMPLE_ANIMALS[:2]]

    def run_eval(components):
        rollout = Rollout(sd, components, SampleSpec(4, 7.5), Prepared(components.denoiser, components.vae))
        return evaluate(rollout, brightness, items, 0, 2)

    unet, lora_config = trained_unet(sd, seed=3)
    lora.save_lora(sd, unet, lora_config, str(tmp_path))
    trained = tiny_components(sd)
    trained.denoiser = unet
    with_lora = run_eval(trained)[2]
    components = tiny_components(sd)
    base = run_eval(components)[2]

    names = mixing.load_soup(components.denoiser, sd, [str(tmp_path / lora.LORA_WEIGHTS)])
    assert names == ["lora_a"]
    results = {c: (w, r) for c, w, _, _, r in mixing.evaluate_soup(components.denoiser, names, [0.0, 1.0, 0.5],
                                                                     lambda: run_eval(components))}
    assert results[0.0][0] == {"lora_a": 0.0} and results[0.5][0] == {"lora_a": 0.5}
    assert torch.equal(results[0.0][1], base)
    torch.testing.assert_close(results[1.0][1], with_lora, atol=1e-6, rtol=1e-5)
    assert (with_lora - base).abs().max() > 1e-4
    middle = results[0.5][1]
    assert (middle - base).abs().max() > 1e-5 and (middle - with_lora).abs().max() > 1e-5


# ---- generation through the family's diffusers pipeline ----


def pipeline(sd, source=None):
    from alignprop.families import parse_source

    components = tiny_components(sd) if source is None else sd.load(parse_source(source, "main", sd))
    pipe = sd.pipeline(components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_seeded_images_do_not_depend_on_batch_size(sd):
    pipe = pipeline(sd)
    one_batch = mixing.generate(pipe, PROMPTS, batch_size=3, **SETTINGS)
    assert one_batch.shape == (3, 32, 32, 3) and one_batch.dtype == np.float32
    assert np.array_equal(mixing.generate(pipe, PROMPTS, batch_size=3, **SETTINGS), one_batch)
    np.testing.assert_allclose(mixing.generate(pipe, PROMPTS, batch_size=2, **SETTINGS), one_batch, atol=1e-5)
    other_seed = mixing.generate(pipe, PROMPTS, batch_size=3, **{**SETTINGS, "seed": 8})
    assert np.abs(other_seed - one_batch).max() > 1e-2


def test_lora_weight_zero_reproduces_the_base_model(sd, loras):
    pipe = pipeline(sd)
    base = mixing.generate(pipe, PROMPTS[:2], batch_size=2, **SETTINGS)
    mixing.load_mix(pipe.unet, sd, [(loras["a"]["run"], 0.0)])
    assert np.array_equal(mixing.generate(pipe, PROMPTS[:2], batch_size=2, **SETTINGS), base)
    mixing.set_mix(pipe.unet, ["lora_0"], [1.0])
    assert np.abs(mixing.generate(pipe, PROMPTS[:2], batch_size=2, **SETTINGS) - base).max() > 1e-2


def test_fused_export_reproduces_the_lora_pipeline(sd, loras, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = pipeline(sd)
    mixing.load_mix(pipe.unet, sd, [(loras["a"]["run"], 0.7), (loras["c"]["run"], 0.4)])
    with_lora = mixing.generate(pipe, PROMPTS, batch_size=3, **SETTINGS)
    mixing.export_fused(pipe, sd, str(tmp_path / "fused"))
    fused = StableDiffusionPipeline.from_pretrained(str(tmp_path / "fused"))
    fused.set_progress_bar_config(disable=True)
    assert type(fused.scheduler).__name__ == "DDIMScheduler"
    assert not any("lora" in name for name, _ in fused.unet.named_parameters())
    np.testing.assert_allclose(mixing.generate(fused, PROMPTS, batch_size=3, **SETTINGS), with_lora, atol=1e-5)
    # ...and through our own loader (a local folder), as `--config.model.source=OUT_DIR` does.
    np.testing.assert_allclose(mixing.generate(pipeline(sd, str(tmp_path / "fused")), PROMPTS, batch_size=3,
                                               **SETTINGS), with_lora, atol=1e-5)
