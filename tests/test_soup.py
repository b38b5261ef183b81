"""Soup helpers: reward columns of a spec, [B, R] rewards from a weighted sum, the summary, coefficient parsing."""

import pytest
import torch

from alignprop import soup
from alignprop.rewards import weighted_sum


def test_reward_columns():
    assert soup.reward_columns("aesthetic") == ["aesthetic"]
    assert soup.reward_columns("aesthetic:2") == ["total", "aesthetic"]
    assert soup.reward_columns("aesthetic:1,hps:20") == ["total", "aesthetic", "hps"]


def test_columns_reward_fn_stacks_total_and_components():
    def constant(value):
        return lambda images, prompts, metadata: (torch.full((len(images),), value), {})

    components = [("aesthetic", 1.0), ("hps", 20.0)]
    fn = soup.columns_reward_fn(
        weighted_sum(components, {"aesthetic": constant(5.0), "hps": constant(0.25)}), ["total", "aesthetic", "hps"]
    )
    rewards, _ = fn(torch.zeros(3, 3, 8, 8), ["a"] * 3, [{}] * 3)
    assert torch.equal(rewards, torch.tensor([[10.0, 5.0, 0.25]] * 3))
    single, _ = soup.columns_reward_fn(constant(2.0), ["aesthetic"])(torch.zeros(2, 3, 8, 8), ["a"] * 2, [{}] * 2)
    assert single.shape == (2, 1)

    summary = soup.summarize(torch.tensor([[1.0, 2.0], [3.0, 2.0]]), ["total", "hps"])
    assert summary == {"total": {"mean": 2.0, "std": pytest.approx(2**0.5)}, "hps": {"mean": 2.0, "std": 0.0}}
    assert soup.summarize(torch.tensor([[1.0]]), ["x"]) == {"x": {"mean": 1.0, "std": 0.0}}


def test_parse_coefficients():
    assert soup.parse_coefficients(["0", "0.5", "1.5", "-0.25"]) == [0.0, 0.5, 1.5, -0.25]
    for bad in (["0", "half"], ["inf"], []):
        with pytest.raises(ValueError, match="--coefficients"):
            soup.parse_coefficients(bad)
