"""K (the number of last steps that keep gradients): drawn once per rollout, seeded, in bounds."""

import collections
import math

import pytest
import torch

from alignprop.truncation import Truncation

T = 50


def _draws(mode, n, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    truncation = Truncation(mode, T, **kw)
    return [truncation.draw(g) for _ in range(n)]


def test_fixed():
    assert _draws("fixed", 5, k=7) == [7] * 5


def test_uniform_reproducible_in_bounds_and_uniform():
    draws = _draws("uniform", 20000, k_min=3, k_max=12)
    assert draws == _draws("uniform", 20000, k_min=3, k_max=12)
    assert draws != _draws("uniform", 20000, seed=1, k_min=3, k_max=12)
    assert min(draws) == 3 and max(draws) == 12
    counts = collections.Counter(draws)
    expected = len(draws) / 10
    chi2 = sum((counts[k] - expected) ** 2 / expected for k in range(3, 13))
    assert chi2 < 27.9  # chi-square, 9 degrees of freedom, p = 0.001


def test_uniform_full_range_matches_paper():
    """AlignProp's randomized truncation: K ~ U over all steps; mean (1 + T) / 2."""
    draws = _draws("uniform", 20000, k_min=1, k_max=T)
    mean = sum(draws) / len(draws)
    assert abs(mean - (1 + T) / 2) < 0.4  # std of the mean ~ 14.4 / sqrt(20000) = 0.1


def _clipped_gaussian_k_distribution(cut_mean, cut_std, k_min, k_max):
    """P(K = k) for K = clip(T - round(cut), k_min, k_max), cut ~ N(mean, std), from the normal CDF."""
    cdf = lambda x: 0.5 * (1 + math.erf((x - cut_mean) / (cut_std * math.sqrt(2))))
    probs = {}
    for k in range(k_min, k_max + 1):
        # K = k  <=>  round(cut) = T - k  <=>  cut in [T - k - 0.5, T - k + 0.5); ends absorb the clipped tails.
        hi = 1.0 if k == k_min else cdf(T - k + 0.5)
        lo = 0.0 if k == k_max else cdf(T - k - 0.5)
        probs[k] = hi - lo
    return probs


def test_gaussian_cut_point():
    draws = _draws("gaussian", 20000, k_min=1, k_max=T, cut_mean=42.0, cut_std=5.0)
    ks = torch.tensor(draws, dtype=torch.float64)
    assert ks.min() >= 1 and ks.max() <= T
    probs = _clipped_gaussian_k_distribution(42.0, 5.0, 1, T)
    mean = sum(k * p for k, p in probs.items())
    std = math.sqrt(sum((k - mean) ** 2 * p for k, p in probs.items()))
    assert 7.5 < mean < 8.5  # the official code's "K ~ 8"
    assert abs(ks.mean().item() - mean) < 5 * std / math.sqrt(len(draws))
    assert abs(ks.std().item() - std) < 0.1
    assert abs((ks == 1).double().mean().item() - probs[1]) < 0.01  # the clipped tail lands on k_min


def test_gaussian_is_clipped_to_bounds():
    draws = _draws("gaussian", 2000, k_min=4, k_max=6, cut_mean=25.0, cut_std=20.0)
    assert set(draws) <= {4, 5, 6} and {4, 6} <= set(draws)


def test_unknown_mode():
    with pytest.raises(ValueError, match="fixed, uniform, gaussian"):
        Truncation("per_step", T).draw(torch.Generator())


def test_problems_name_the_keys():
    from alignprop.truncation import problems
    from helpers import config

    assert problems(config()) == []
    bad = problems(config(overrides={"train.truncation": "random"}))
    assert bad == ["config.train.truncation='random': must be one of fixed, uniform, gaussian"]
    assert "config.train.k=9: must be in [1, sample.num_steps=8]" in problems(
        config(overrides={"train.truncation": "fixed", "train.k": 9}))
    assert "k_max <= sample.num_steps=8" in problems(config(overrides={"train.k_max": 9}))[0]
    # A cut point far outside the steps clips every draw to one bound: K would never change.
    (clipped,) = problems(config(overrides={"train.truncation": "gaussian"}))  # cut_mean 42 of 8 steps
    assert "config.train.cut_mean=42.0" in clipped and "clipped to k_min" in clipped
    assert (
        problems(config(overrides={"train.truncation": "gaussian", "train.cut_mean": 5.0, "train.cut_std": 1.0})) == []
    )
