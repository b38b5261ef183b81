"""The checkpoint plan from the memory budget: the cost and peak arithmetic, the choice at its boundaries, and the
start-up probe's side effects (none) on tiny models. The probe's byte counts are the card's allocator's; how well
the predicted peak matches the measured one is recorded from the GPU in BENCHMARKS.md."""

import pytest
import torch

from alignprop import memory, speed
from alignprop.memory import GIB, SLACK, Sizes
from alignprop.methods import Method
from alignprop.rollout import Rollout, SampleSpec
from alignprop.truncation import Truncation
from helpers import config

# An SD 1.5-like step in round numbers: 4 GiB of weights, a grad call keeps 6 GiB with its blocks kept and 0.5 GiB
# with them recomputed, one call's forward and backward peaks at 7 / 1.5 GiB, the decoder and reward at 2 GiB.
SIZES = Sizes(base=4 * GIB, held={False: 6 * GIB, True: GIB // 2}, step_peak={False: 7 * GIB, True: 3 * GIB // 2},
              post=2 * GIB)


def test_cost_counts_denoiser_forwards():
    # blocks off: kept 3 (forward, backward ~ 2), recomputed 4; blocks on: one more forward each.
    assert memory.cost(False, 2, 10) == 2 * 3 + 8 * 4
    assert memory.cost(True, 2, 10) == 2 * 4 + 8 * 5
    assert memory.cost(False, 50, 10) == 10 * 3  # more kept steps than grad steps: all of them kept
    assert memory.cost(True, 0, 1) == 5


def test_predicted_peak():
    # Backward runs last step first: the kept steps' activations under the decoder and reward (3 x 6 + 2), then their
    # own backward (2 x 6 + 7), then, with them freed, a recomputed call alone (7).
    assert memory.predicted_peak(SIZES, False, 3, 50) == 4 * GIB + int(SLACK * (3 * 6 + 2) * GIB)
    assert memory.predicted_peak(SIZES, False, 0, 50) == 4 * GIB + int(SLACK * 7 * GIB)
    assert memory.predicted_peak(SIZES, False, 1, 1) == 4 * GIB + int(SLACK * max(6 + 2, 7) * GIB)
    assert memory.predicted_peak(SIZES, True, 0, 50) == 4 * GIB + int(SLACK * 2 * GIB)
    assert memory.predicted_peak(SIZES, True, 9, 4) == memory.predicted_peak(SIZES, True, 4, 4)  # at most K kept


def test_an_ample_budget_keeps_every_grad_step_with_its_blocks():
    plan = memory.choose(SIZES, 1000 * GIB, k_max=50)
    assert (plan.checkpoint_blocks, plan.uncheckpointed_steps, plan.fits) == (False, 50, True)
    assert plan.cost == 50 * 3


@pytest.mark.parametrize("kept", [0, 1, 4])
def test_the_budget_decides_how_many_steps_keep_their_activations(kept):
    exact = memory.predicted_peak(SIZES, False, kept, 50)
    plan = memory.choose(SIZES, exact, k_max=50)
    assert (plan.checkpoint_blocks, plan.uncheckpointed_steps, plan.predicted_bytes) == (False, kept, exact)
    below = memory.choose(SIZES, exact - 1, k_max=50)
    assert (below.checkpoint_blocks, below.uncheckpointed_steps) != (False, kept)
    assert below.predicted_bytes <= exact - 1


def test_blocks_recomputed_when_one_call_with_its_blocks_does_not_fit():
    budget = memory.predicted_peak(SIZES, False, 0, 50) - 1
    plan = memory.choose(SIZES, budget, k_max=50)
    assert plan.checkpoint_blocks and plan.fits
    # With the blocks recomputed each kept step holds 0.5 GiB and saves one forward: as many as fit.
    kept = plan.uncheckpointed_steps
    assert memory.predicted_peak(SIZES, True, kept, 50) <= budget < memory.predicted_peak(SIZES, True, kept + 1, 50)


def test_k1_blocks_off_when_it_fits():
    # K=1: one grad call; keeping it with its blocks costs 3 forwards instead of 4 (today's fixed plan).
    plan = memory.choose(SIZES, 20 * GIB, k_max=1)
    assert (plan.checkpoint_blocks, plan.uncheckpointed_steps, plan.cost) == (False, 1, 3)


def test_nothing_fits_gives_the_lowest_memory_plan_and_says_so():
    plan = memory.choose(SIZES, 5 * GIB, k_max=50)
    assert (plan.checkpoint_blocks, plan.uncheckpointed_steps, plan.fits) == (True, 0, False)
    assert plan.predicted_bytes == memory.predicted_peak(SIZES, True, 0, 50)
    assert "does NOT fit" in plan.describe()


def test_a_probe_that_ran_out_of_memory_rules_its_plan_out():
    sizes = Sizes(SIZES.base, {True: SIZES.held[True]}, {True: SIZES.step_peak[True]}, SIZES.post)
    plan = memory.choose(sizes, 1000 * GIB, k_max=50)
    assert (plan.checkpoint_blocks, plan.uncheckpointed_steps) == (True, 50)


@pytest.mark.parametrize("value", ["auto", "off", 12, 7.5, "20"])
def test_budget_values_accepted(value):
    c = config()
    c.speed.memory_budget_gib = value if isinstance(value, str) else str(value)
    assert not [p for p in speed.problems(c) if "memory_budget_gib" in p]


@pytest.mark.parametrize("value", ["lots", "0", "-3"])
def test_bad_budget_named(value):
    c = config()
    c.speed.memory_budget_gib = value
    assert [p for p in speed.problems(c) if p.startswith(f"config.speed.memory_budget_gib={value!r}: must be")]


def test_budget_in_bytes():
    assert memory.budget_bytes("12", torch.device("cpu")) == 12 * GIB
    assert memory.budget_bytes(1.5, torch.device("cpu")) == 3 * GIB // 2


class ScriptedMeter:
    """Allocator counters that read 0: the probe's arithmetic and side effects, not the bytes, are tested here."""

    def __init__(self):
        self.calls = 0

    def allocated(self):
        self.calls += 1
        return 0

    def reset_peak(self):
        pass

    def peak(self):
        return 0


def _reward(images, prompts, metadata):
    rewards = images.flatten(1).mean(1)
    return rewards, {}, {}


@pytest.fixture
def compiled_rollout(lora_components, sd):
    from alignprop import lora

    torch._dynamo.reset()
    compiled = config(overrides={"speed.compile": True}).speed
    prepared = speed.prepare(sd, lora_components, compiled, backend="aot_eager")
    assert prepared.compiled
    return Rollout(sd, lora_components, SampleSpec(4, 7.5), prepared), lora.trainable_parameters(
        lora_components.denoiser)


def test_the_probe_leaves_nothing_behind(compiled_rollout):
    """It runs both block settings eagerly (no graph compiled), restores block checkpointing, leaves no gradient
    on the LoRA and does not draw from the global RNG."""
    from torch._dynamo.utils import counters

    rollout, params = compiled_rollout
    denoiser = rollout.prepared.denoiser
    assert denoiser.is_gradient_checkpointing  # the config's checkpoint_blocks=True
    graphs = counters["stats"]["unique_graphs"]
    rng = torch.get_rng_state()
    items = [("a cat", {}), ("a dog", {})]
    sizes = memory.measure(rollout, _reward, params, items, _no_autocast, ScriptedMeter())
    assert set(sizes.held) == set(sizes.step_peak) == {False, True}
    assert sizes.base == 3 * sum(p.numel() * 4 for p in params)  # the allocator reads 0: the optimizer states alone
    assert counters["stats"]["unique_graphs"] == graphs
    assert denoiser.is_gradient_checkpointing
    assert all(p.grad is None for p in params)
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_probe_out_of_memory_is_caught(compiled_rollout, monkeypatch):
    rollout, params = compiled_rollout
    real = memory._grad_call

    def fails_with_blocks_kept(guided, latents, timestep, meter):
        if not rollout.prepared.denoiser.is_gradient_checkpointing:
            raise torch.cuda.OutOfMemoryError("probe")
        return real(guided, latents, timestep, meter)

    monkeypatch.setattr(memory, "_grad_call", fails_with_blocks_kept)
    sizes = memory.measure(rollout, _reward, params, [("a cat", {})], _no_autocast, ScriptedMeter())
    assert set(sizes.held) == {True}
    assert all(p.grad is None for p in params)


def test_apply_puts_the_plan_in_force(compiled_rollout):
    rollout, _ = compiled_rollout
    memory.apply(memory.MemoryPlan(False, 3, 0, 0, 0, True, 4), rollout.prepared)
    assert not rollout.prepared.denoiser.is_gradient_checkpointing
    assert rollout.prepared.uncheckpointed_steps == 3


def test_on_the_cpu_the_config_plan_stays(compiled_rollout):
    rollout, params = compiled_rollout
    c = config()
    before = (rollout.prepared.uncheckpointed_steps, rollout.prepared.denoiser.is_gradient_checkpointing)
    method = Method("alignprop", 4, Truncation("fixed", 4, 1))
    for setting in ("auto", "off", "8"):
        c.speed.memory_budget_gib = setting
        assert memory.plan_memory(c, rollout, _reward, params, [("a cat", {})], method, _no_autocast) is None
    assert (rollout.prepared.uncheckpointed_steps, rollout.prepared.denoiser.is_gradient_checkpointing) == before


def _no_autocast():
    return torch.autocast("cpu", enabled=False)
