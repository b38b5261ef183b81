"""The training script's failures, interrupts and launches end to end in subprocesses, offline on the CPU
(the slow tier; split from test_scripts.py so that the two halves run side by side): SIGTERM, non-finite
streaks, a crash mid-checkpoint, trackers, two processes, the launch scripts."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO, TINY, TRAIN, records, run_script, train

pytestmark = pytest.mark.slow


def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, *TRAIN, f"--config.logdir={tmp_path}", "--config.run_name=sig", "--config.num_epochs=50",
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
    steps = [r["step"] for r in records(os.path.join(tmp_path, "sig"))]
    last = steps[-1]
    assert last < 100 and os.path.isdir(os.path.join(tmp_path, "sig", f"checkpoint_{last}"))
    assert "resume with --config.resume_from=" in stderr
    train(tmp_path, f"--config.resume_from={os.path.join(tmp_path, 'sig')}", f"--config.num_epochs={last // 2 + 1}")
    steps = [r["step"] for r in records(os.path.join(tmp_path, "sig"))]
    assert steps == list(range(1, 2 * (last // 2 + 1) + 1))


def test_nonfinite_streak_stops_with_a_checkpoint(tmp_path):
    # A loss coefficient beyond float32 range (3.4e38) makes every loss inf.
    result = run_script([*TRAIN, f"--config.logdir={tmp_path}", "--config.run_name=nan",
                         "--config.train.loss_coeff=1e40", "--config.train.max_nonfinite_steps=2"], timeout=600)
    assert result.returncode != 0
    assert "2 consecutive optimizer steps with a non-finite loss" in result.stderr
    run_dir = os.path.join(tmp_path, "nan")
    assert [r["nonfinite"] > 0 for r in records(run_dir)] == [True, True]
    assert os.path.isdir(os.path.join(run_dir, "checkpoint_2"))


def test_crash_during_checkpoint_write_leaves_the_previous_one(tmp_path):
    """Kill the process inside accelerate's save_state (2 epochs, a checkpoint each); resume must ignore the
    half-written folder."""
    from alignprop.checkpoints import list_checkpoints, resolve_resume

    run_dir = os.path.join(tmp_path, "crash")
    args = [*TRAIN, f"--config.logdir={tmp_path}", "--config.run_name=crash", "--config.num_epochs=2",
            "--config.save_freq=1"]
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
        f"sys.argv = {args!r}\n"
        "runpy.run_path('scripts/train.py', run_name='__main__')\n"
    )
    result = run_script(["-c", crash], timeout=600)
    assert result.returncode == 9, result.stderr[-3000:]
    assert os.path.isdir(os.path.join(run_dir, "checkpoint_4.tmp"))
    assert resolve_resume(run_dir) == os.path.join(run_dir, "checkpoint_2")
    assert list_checkpoints(run_dir) == [os.path.join(run_dir, "checkpoint_2")]
    train(tmp_path, f"--config.resume_from={run_dir}", "--config.num_epochs=2", "--config.save_freq=1")
    assert os.path.isdir(os.path.join(run_dir, "checkpoint_4"))
    assert not os.path.exists(os.path.join(run_dir, "checkpoint_4.tmp"))


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_trackers_offline(tmp_path, tracker):
    train(tmp_path, "--config.run_name=t", f"--config.log_with={tracker}", "--config.num_epochs=1",
          "--config.train.total_samples_per_epoch=4", "--config.sample.num_eval_samples=2",
          env={"WANDB_MODE": "offline"})
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(tmp_path, "t")) for f in fs]
    marker = "events.out.tfevents" if tracker == "tensorboard" else ".wandb"
    assert any(marker in f for f in files), files


def test_two_cpu_processes_form_one_run(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on a machine without GPUs: one run of 2 processes (gloo),
    one writer, one metrics line per optimizer step; `--cpu --num_processes 2` is refused, not run as one."""
    common = ["--config", TINY, "--config.num_epochs=1", "--config.train.total_batch_size=4",
              "--config.train.total_samples_per_epoch=4", "--config.sample.num_eval_samples=2",
              f"--config.logdir={tmp_path}", "--config.run_name=two"]
    env = {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    result = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--mixed_precision", "no",
                             "--dynamo_backend", "no", "scripts/train.py", *common],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "2 process(es) x 2 per GPU x 1 accumulation = 4 samples" in result.stderr
    assert "LoRA weights are bit-identical on all 2 processes" in result.stderr
    assert [r["step"] for r in records(os.path.join(tmp_path, "two"))] == [1]
    assert [d for d in os.listdir(tmp_path) if d != "hf"] == ["two"]  # one run folder
    result = subprocess.run([accelerate, "launch", "--cpu", "--num_processes", "2", "--mixed_precision", "no",
                             "--dynamo_backend", "no", "scripts/train.py", *common[:-1], "--config.run_name=cpu"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "--cpu --num_processes 2` starts one process, not 2" in result.stderr
    assert not os.path.exists(tmp_path / "cpu")


def test_launch_script_shows_one_message_and_the_script_exit_code(tmp_path):
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
           "MIXED_PRECISION": "no", "HF_HOME": str(tmp_path / "hf"), "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": REPO}
    result = subprocess.run(["bash", os.path.join(REPO, "aesthetic_k1.sh"), "--config.train.learnin_rate=1"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "config.train.learnin_rate: no such config key; did you mean config.train.learning_rate?" in result.stderr
    assert "Traceback" not in result.stderr and "CalledProcessError" not in result.stderr


def test_launch_script_runs_on_cpu(tmp_path):
    """`bash aesthetic_k1.sh` through `accelerate launch`, with no accelerate config file present."""
    overrides = [
        "--config.model.source=tiny",
        "--config.reward.aesthetic.clip_model=tiny",
        "--config.sample.num_steps=2",
        "--config.train.batch_size_per_gpu=2",
        "--config.train.total_batch_size=4",
        "--config.train.total_samples_per_epoch=4",
        "--config.num_epochs=1",
        "--config.sample.num_eval_samples=2",
        "--config.run_name=launch",
        f"--config.logdir={tmp_path}",
    ]
    env = {
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
        "MIXED_PRECISION": "no",
        "HF_HOME": str(tmp_path / "hf"),
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "PYTHONPATH": REPO,
    }
    result = subprocess.run(
        ["bash", os.path.join(REPO, "aesthetic_k1.sh"), *overrides],
        cwd=tmp_path,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 process(es) x 2 per GPU x 2 accumulation = 4 samples" in result.stderr
    saved = json.load(open(os.path.join(tmp_path, "launch", "config.json")))["config"]
    assert saved["train"]["truncation"] == "fixed"  # aesthetic_k1's setting reached the script
    for name in ("aesthetic", "aesthetic_k1", "hps", "hps_k1"):
        text = open(os.path.join(REPO, f"{name}.sh")).read()
        assert f'launch.sh" {name} ' in text and os.access(os.path.join(REPO, f"{name}.sh"), os.X_OK)
