"""Two processes on the CPU (gloo): gradients are synced, ranks draw different randomness.

The same tiny run on 2 processes (accumulation 1) and on 1 process (accumulation 2, micro-batch j drawing
rank j's streams) must give the same LoRA; and the peers' bug (forward through the unwrapped module)
must be caught by the same check.
"""

import os
import socket

import pytest
import torch

from helpers import REPO, run_script

pytestmark = pytest.mark.slow


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out, mode, processes):
    worker = os.path.join(REPO, "tests", "dist_worker.py")
    if processes == 1:
        args = [worker, str(out), mode]
    else:
        args = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port()), worker, str(out), mode]
    result = run_script(args, timeout=300, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(out / f"{mode}_rank{r}.pt", weights_only=False) for r in range(processes)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    return {"ddp": _run(out, "ddp", 2), "single": _run(out, "single", 1), "unwrapped": _run(out, "unwrapped", 2)}


def _max_diff(a, b):
    assert a["lora"].keys() == b["lora"].keys() and a["lora"]
    return max((a["lora"][k] - b["lora"][k]).abs().max().item() for k in a["lora"])


def test_lora_bit_identical_across_ranks(runs):
    rank0, rank1 = runs["ddp"]
    assert rank0["accumulation"] == 1
    assert _max_diff(rank0, rank1) == 0.0


def test_two_processes_equal_one_process_over_the_same_batch(runs):
    (ddp, _), (single,) = runs["ddp"], runs["single"]
    assert single["accumulation"] == 2
    # The same samples: single micro-batches interleave rank 0 and rank 1.
    ranks = [r["seen"] for r in runs["ddp"]]
    interleaved = [s for pair in zip(*ranks) for s in pair]
    assert [s["k"] for s in single["seen"]] == [s["k"] for s in interleaved]
    assert [s["prompts"] for s in single["seen"]] == [s["prompts"] for s in interleaved]
    # Metrics are reduced over all samples, so they agree too.
    for a, b in zip(ddp["metrics"], single["metrics"]):
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["k_mean"] == pytest.approx(b["k_mean"])  # over both ranks' rollouts, not rank 0's
    # Weights after 3 AdamW steps at lr 3e-2: all-reduce vs accumulation sum in a different order, and
    # Adam divides by sqrt(v), which magnifies round-off in near-zero gradient entries; 1e-3 is 1/30 of
    # one step's size (lr), while the unsynced bug below differs by ~0.1.
    assert _max_diff(ddp, single) < 1e-3


def test_evaluation_shared_out_between_processes_equals_one_process(runs):
    """5 items on 2 processes (3 + 2, the second share padded): every rank returns all 5, in order, and
    they are the images and rewards of a 1-process evaluation (each item has its own noise)."""
    (rank0, rank1), (single,) = runs["ddp"], runs["single"]
    a, b, ref = rank0["eval"], rank1["eval"], single["eval"]
    assert a["images"].shape[0] == a["rewards"].shape[0] == 5 and a["prompts"] == ref["prompts"]
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["rewards"], b["rewards"])
    # Other batch compositions on the CPU: float32 round-off only.
    torch.testing.assert_close(a["images"], ref["images"], atol=1e-5, rtol=0)
    torch.testing.assert_close(a["rewards"], ref["rewards"], atol=1e-5, rtol=1e-5)


def test_the_unwrapped_forward_bug_is_detected(runs):
    rank0, rank1 = runs["unwrapped"]
    assert _max_diff(rank0, rank1) > 1e-2


def test_ranks_draw_different_randomness_that_does_not_repeat(runs):
    rank0, rank1 = (r["seen"] for r in runs["ddp"])
    assert [s["prompts"] for s in rank0] != [s["prompts"] for s in rank1]
    states0 = [s["noise_state"] for s in rank0]
    states1 = [s["noise_state"] for s in rank1]
    assert all(not torch.equal(a, b) for a, b in zip(states0, states1))
    assert all(not torch.equal(a, b) for a, b in zip(states0, states0[1:]))
