"""Soup helpers: reward columns of a spec, [B, R] rewards from a weighted sum, the summary, coefficient parsing."""

import copy

import pytest
import torch

from alignprop import evaluation, soup
from alignprop.rewards import weighted_sum


def test_reward_columns():
    assert evaluation.reward_columns("aesthetic") == ["aesthetic"]
    assert evaluation.reward_columns("aesthetic:2") == ["total", "aesthetic"]
    assert evaluation.reward_columns("aesthetic:1,hps:20") == ["total", "aesthetic", "hps"]


def test_columns_reward_fn_stacks_total_and_components():
    def constant(value):
        return lambda images, prompts, metadata: (torch.full((len(images),), value), {})

    components = [("aesthetic", 1.0), ("hps", 20.0)]
    fn = evaluation.columns_reward_fn(
        weighted_sum(components, {"aesthetic": constant(5.0), "hps": constant(0.25)}), ["total", "aesthetic", "hps"]
    )
    rewards, _ = fn(torch.zeros(3, 3, 8, 8), ["a"] * 3, [{}] * 3)
    assert torch.equal(rewards, torch.tensor([[10.0, 5.0, 0.25]] * 3))
    single, _ = evaluation.columns_reward_fn(constant(2.0), ["aesthetic"])(torch.zeros(2, 3, 8, 8), ["a"] * 2, [{}] * 2)
    assert single.shape == (2, 1)

    summary = evaluation.summarize(torch.tensor([[1.0, 2.0], [3.0, 2.0]]), ["total", "hps"])
    assert summary == {"total": {"mean": 2.0, "std": pytest.approx(2**0.5)}, "hps": {"mean": 2.0, "std": 0.0}}
    assert evaluation.summarize(torch.tensor([[1.0]]), ["x"]) == {"x": {"mean": 1.0, "std": 0.0}}


def test_parse_coefficients():
    assert soup.parse_coefficients(["0", "0.5", "1.5", "-0.25"]) == [0.0, 0.5, 1.5, -0.25]
    for bad in (["0", "half"], ["inf"], []):
        with pytest.raises(ValueError, match="--coefficients"):
            soup.parse_coefficients(bad)


def test_soup_with_the_base_model_goes_from_base_to_lora(components, tmp_path, one_thread):
    """Without LoRA B: c = 0 evaluates as the base model, c = 1 as the LoRA loaded by the training loader."""
    import contextlib

    from alignprop import checkpoints, models
    from alignprop.evaluation import evaluate
    from alignprop.prompts import EVAL_SIMPLE_ANIMALS
    from alignprop.sampling import SamplingSpec
    from conftest import randomize_lora

    def brightness(images, prompts, metadata):
        return images.mean(dim=(1, 2, 3)), {}

    items = [(p, {}) for p in EVAL_SIMPLE_ANIMALS[:2]]
    spec = SamplingSpec(num_steps=4, guidance_scale=7.5, eta=0.0)
    negative = models.encode_prompts(components.text_encoder, components.tokenizer, [""])

    def run_eval(unet, comps):
        return evaluate(unet, comps, brightness, items, spec, 0, 2, torch.device("cpu"), negative, contextlib.nullcontext)

    trained = models.Components(**{**vars(components), "unet": copy.deepcopy(components.unet)})
    lora_config = models.add_lora(trained.unet, rank=4, alpha=8.0)
    randomize_lora(trained.unet, seed=3, scale=0.2)
    checkpoints.save_lora(trained.unet, lora_config, str(tmp_path))
    with_lora = run_eval(trained.unet, trained)[2]
    base = run_eval(components.unet, components)[2]

    names = soup.load_soup(components.unet, [str(tmp_path / checkpoints.LORA_WEIGHTS)])
    assert names == ["lora_a"]
    results = {c: (w, r) for c, w, _, _, r in soup.evaluate_soup(components.unet, names, [0.0, 1.0, 0.5],
                                                                   lambda: run_eval(components.unet, components))}
    assert results[0.0][0] == {"lora_a": 0.0} and results[0.5][0] == {"lora_a": 0.5}
    assert torch.equal(results[0.0][1], base)
    torch.testing.assert_close(results[1.0][1], with_lora, atol=1e-6, rtol=1e-5)
    assert (with_lora - base).abs().max() > 1e-4
    middle = results[0.5][1]
    assert (middle - base).abs().max() > 1e-5 and (middle - with_lora).abs().max() > 1e-5
