"""The batch plan keeps the paper's effective batch on any number of GPUs."""

import pytest

from alignprop.plan import BatchPlanError, make_batch_plan


@pytest.mark.parametrize("processes,accumulation", [(1, 32), (2, 16), (4, 8), (8, 4)])
def test_paper_plan(processes, accumulation):
    plan = make_batch_plan(128, 256, 4, processes)
    assert plan.accumulation_steps == accumulation
    assert plan.steps_per_epoch == 2
    assert plan.batch_size_per_gpu * processes * plan.accumulation_steps == 128
    assert plan.samples_per_process_per_epoch == 256 // processes
    assert "128 samples per optimizer step" in plan.describe()


def test_indivisible_total_batch_proposes_values():
    with pytest.raises(BatchPlanError) as e:
        make_batch_plan(128, 256, 4, 3)
    msg = str(e.value)
    assert "config.train.total_batch_size=128" in msg and "config.train.batch_size_per_gpu=4" in msg
    assert "[120, 132]" in msg  # multiples of 4 x 3 around 128


def test_indivisible_samples_per_epoch():
    with pytest.raises(BatchPlanError, match=r"total_samples_per_epoch=200 .* \[128, 256\]"):
        make_batch_plan(128, 200, 4, 1)


def test_non_positive():
    with pytest.raises(BatchPlanError, match="batch_size_per_gpu=0"):
        make_batch_plan(128, 256, 0, 1)


def test_two_nodes_of_eight_gpus():
    """`accelerate launch --num_machines 2 --num_processes 16 ...`: 16 processes, the paper's batch of 128."""
    plan = make_batch_plan(128, 256, 4, 16)
    assert (plan.accumulation_steps, plan.steps_per_epoch, plan.samples_per_process_per_epoch) == (2, 2, 16)
    assert plan.describe().startswith("batch plan: 16 process(es) x 4 per GPU x 2 accumulation = 128 samples")
    # At 8 per GPU the 16 GPUs take the whole batch in one micro-batch each.
    assert make_batch_plan(128, 256, 8, 16).accumulation_steps == 1
    with pytest.raises(BatchPlanError, match=r"config.train.batch_size_per_gpu to one of \[1, 2\]"):
        make_batch_plan(128, 256, 3, 16)
