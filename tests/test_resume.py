"""Runs that are stopped and resumed: exact resume, SIGTERM, non-finite streaks, a crash mid-checkpoint, eval-only."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, run_script

TINY = ["scripts/train.py", "--config", "config/align_prop.py:tiny"]
COMPARED = ("loss", "reward_mean", "reward_std", "k_mean", "grad_norm")


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _train(logdir, *overrides, timeout=600):
    result = run_script([*TINY, f"--config.logdir={logdir}", *overrides], timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("full")
    _train(logdir, "--config.run_name=full")
    return os.path.join(logdir, "full")


def test_resume_continues_exactly(uninterrupted, tmp_path):
    _train(tmp_path, "--config.run_name=part", "--config.num_epochs=2")  # stops after step 4, checkpoint_4
    run_dir = os.path.join(tmp_path, "part")
    assert [r["step"] for r in _records(run_dir)] == [1, 2, 3, 4]
    _train(tmp_path, f"--config.resume_from={run_dir}")  # the latest complete checkpoint of the run folder
    resumed, full = _records(run_dir), _records(uninterrupted)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for a, b in zip(resumed, full):
        for key in COMPARED:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["step"], key)
    final = json.load(open(os.path.join(run_dir, "eval_final.json")))
    expected = json.load(open(os.path.join(uninterrupted, "eval_final.json")))
    assert final["reward_mean"] == pytest.approx(expected["reward_mean"], rel=1e-6)


def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, *TINY, f"--config.logdir={tmp_path}", "--config.run_name=sig", "--config.num_epochs=50",
         "--config.save_freq=100"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    metrics = os.path.join(tmp_path, "sig", "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and not (os.path.exists(metrics) and open(metrics).read().count("\n") >= 1):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    steps = [r["step"] for r in _records(os.path.join(tmp_path, "sig"))]
    last = steps[-1]
    assert last < 100 and os.path.isdir(os.path.join(tmp_path, "sig", f"checkpoint_{last}"))
    assert "resume with --config.resume_from=" in stderr
    _train(tmp_path, f"--config.resume_from={os.path.join(tmp_path, 'sig')}", f"--config.num_epochs={last // 2 + 1}")
    steps = [r["step"] for r in _records(os.path.join(tmp_path, "sig"))]
    assert steps == list(range(1, 2 * (last // 2 + 1) + 1))


def test_nonfinite_streak_stops_with_a_checkpoint(tmp_path):
    # A loss coefficient beyond float32 range (3.4e38) makes every loss inf.
    result = run_script(
        [*TINY, f"--config.logdir={tmp_path}", "--config.run_name=nan", "--config.train.loss_coeff=1e40",
         "--config.train.max_nonfinite_steps=2"],
        timeout=600,
    )
    assert result.returncode != 0
    assert "2 consecutive optimizer steps with a non-finite loss" in result.stderr
    run_dir = os.path.join(tmp_path, "nan")
    records = _records(run_dir)
    assert [r["nonfinite"] > 0 for r in records] == [True, True]
    assert os.path.isdir(os.path.join(run_dir, "checkpoint_2"))


def test_crash_during_checkpoint_write_leaves_the_previous_one(tmp_path):
    """Kill the process inside accelerate's save_state (2 epochs, a checkpoint each); resume must ignore the
    half-written folder."""
    run_dir = os.path.join(tmp_path, "crash")
    crash = (
        "import os, runpy, sys, accelerate\n"
        "real = accelerate.Accelerator.save_state\n"
        "def save_state(self, output_dir=None, **kw):\n"
        "    if output_dir.endswith('checkpoint_4.tmp'):\n"
        "        os.makedirs(output_dir, exist_ok=True)\n"
        "        open(os.path.join(output_dir, 'pytorch_lora_weights.safetensors'), 'wb').write(b'half')\n"
        "        os._exit(9)\n"
        "    return real(self, output_dir, **kw)\n"
        "accelerate.Accelerator.save_state = save_state\n"
        f"sys.argv = {['scripts/train.py', '--config', 'config/align_prop.py:tiny', f'--config.logdir={tmp_path}', '--config.run_name=crash', '--config.num_epochs=2', '--config.save_freq=1']!r}\n"
        "runpy.run_path('scripts/train.py', run_name='__main__')\n"
    )
    result = run_script(["-c", crash], timeout=600)
    assert result.returncode == 9
    assert os.path.isdir(os.path.join(run_dir, "checkpoint_4.tmp"))
    from alignprop.checkpoints import list_checkpoints, resolve_resume

    assert resolve_resume(run_dir) == os.path.join(run_dir, "checkpoint_2")
    assert list_checkpoints(run_dir) == [os.path.join(run_dir, "checkpoint_2")]
    _train(tmp_path, f"--config.resume_from={run_dir}", "--config.num_epochs=2", "--config.save_freq=1")
    assert os.path.isdir(os.path.join(run_dir, "checkpoint_4")) and not os.path.exists(
        os.path.join(run_dir, "checkpoint_4.tmp")
    )


def test_eval_only_mode(uninterrupted, tmp_path):
    checkpoint = os.path.join(uninterrupted, "checkpoint_8")
    _train(tmp_path, "--config.num_epochs=0", f"--config.resume_from={checkpoint}")
    summary = json.load(open(os.path.join(uninterrupted, "eval.json")))
    final = json.load(open(os.path.join(uninterrupted, "eval_final.json")))
    # Same LoRA, same prompts, same noise as the end of training.
    assert summary["reward_mean"] == pytest.approx(final["reward_mean"], rel=1e-6)
    assert os.path.exists(os.path.join(uninterrupted, "images", "eval.png"))


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_trackers_offline(tmp_path, tracker):
    result = run_script(
        [*TINY, f"--config.logdir={tmp_path}", "--config.run_name=t", f"--config.log_with={tracker}",
         "--config.num_epochs=1"],
        timeout=600, env={"WANDB_MODE": "offline"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(tmp_path, "t")) for f in fs]
    if tracker == "tensorboard":
        assert any("events.out.tfevents" in f for f in files)
    else:
        assert any(f.endswith(".wandb") for f in files), files
