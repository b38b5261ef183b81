"""The scripts end to end in subprocesses, offline on the CPU (the slow tier): training and what it writes,
resume, signals, non-finite streaks, a crash mid-checkpoint, evaluation only, trackers, the launch
scripts, generation, the soup evaluation and the benchmark."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import REPO, TINY, config, run_script, save_tiny_lora, tiny_components

pytestmark = pytest.mark.slow

TRAIN = ["scripts/train.py", "--config", TINY]
COMPARED = ("loss", "reward_mean", "reward_std", "k_mean", "grad_norm")
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # bitwise-comparable numbers with the in-process side, and faster


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train(logdir, *overrides, timeout=600, env=None):
    result = run_script([*TRAIN, f"--config.logdir={logdir}", *overrides], timeout=timeout, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny run, uninterrupted: 4 epochs of 2 optimizer steps."""
    logdir = tmp_path_factory.mktemp("full")
    result = train(logdir, "--config.run_name=full")
    return os.path.join(logdir, "full"), result


def test_run_folder_contents(tiny_run):
    run_dir, result = tiny_run
    saved = json.load(open(os.path.join(run_dir, "config.json")))
    assert saved["config"]["model"]["source"] == "tiny" and saved["batch_plan"]["accumulation_steps"] == 2
    rows = records(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 9))  # 4 epochs x 2 optimizer steps
    for r in rows:
        assert {"loss", "reward_mean", "reward_std", "k_mean", "seconds", "grad_norm", "reward/aesthetic"} <= r.keys()
        assert 1 <= r["k_mean"] <= 8 and r["seconds"] > 0 and r["skipped"] == 0
    lora_file = os.path.join(run_dir, "pytorch_lora_weights.safetensors")
    assert os.path.getsize(lora_file) > 0 and os.stat(lora_file).st_mode & 0o777 == 0o644
    # Training samples every config.log_image_freq=4 steps, evaluation grids, the reward plot.
    for name in ("eval_initial.png", "eval_final.png", "reward.png", "train_step4.png", "train_step8.png"):
        with Image.open(os.path.join(run_dir, "images", name)) as im:
            assert im.size[0] > 100 and im.size[1] > 100
    final = json.load(open(os.path.join(run_dir, "eval_final.json")))
    assert len(final["samples"]) == 4 and final["samples"][0]["prompt"] == "cheetah"
    assert final["per_reward"]["aesthetic"]["mean"] == pytest.approx(final["reward_mean"])
    # Checkpoints every 2 epochs, complete (with progress.json) and no leftover temporary folder.
    assert sorted(d for d in os.listdir(run_dir) if d.startswith("checkpoint")) == ["checkpoint_4", "checkpoint_8"]
    for ckpt in ("checkpoint_4", "checkpoint_8"):
        assert os.path.exists(os.path.join(run_dir, ckpt, "pytorch_lora_weights.safetensors"))
        assert json.load(open(os.path.join(run_dir, ckpt, "progress.json")))["step"] == int(ckpt.split("_")[1])
    assert "optimizer steps" in result.stderr  # the progress bar


def test_reward_rises(tiny_run):
    run_dir, _ = tiny_run
    rewards = [r["reward_mean"] for r in records(run_dir)]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3
    initial = json.load(open(os.path.join(run_dir, "eval_initial.json")))["reward_mean"]
    final = json.load(open(os.path.join(run_dir, "eval_final.json")))["reward_mean"]
    assert final > initial  # same prompts, same initial noise: the trained LoRA scores higher than the base model


def test_resume_continues_exactly(tiny_run, tmp_path):
    train(tmp_path, "--config.run_name=part", "--config.num_epochs=2")  # stops after step 4, checkpoint_4
    run_dir = os.path.join(tmp_path, "part")
    assert [r["step"] for r in records(run_dir)] == [1, 2, 3, 4]
    record = open(os.path.join(run_dir, "config.json")).read()
    train(tmp_path, f"--config.resume_from={run_dir}")  # the latest complete checkpoint of the run folder
    # The training record is kept; the resume records itself beside it, with what changed.
    assert open(os.path.join(run_dir, "config.json")).read() == record
    resumed_record = json.load(open(os.path.join(run_dir, "config.resume_4.json")))
    assert resumed_record["changes"] == {"num_epochs": [2, 4], "resume_from": ["", run_dir]}
    assert resumed_record["resumed_from"] == os.path.join(run_dir, "checkpoint_4")
    resumed, full = records(run_dir), records(tiny_run[0])
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for a, b in zip(resumed, full):
        for key in COMPARED:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["step"], key)
    final = json.load(open(os.path.join(run_dir, "eval_final.json")))
    expected = json.load(open(os.path.join(tiny_run[0], "eval_final.json")))
    assert final["reward_mean"] == pytest.approx(expected["reward_mean"], rel=1e-6)


def test_eval_only_mode(tiny_run, tmp_path):
    checkpoint = os.path.join(tiny_run[0], "checkpoint_8")
    record = open(os.path.join(tiny_run[0], "config.json")).read()
    train(tmp_path, "--config.num_epochs=0", f"--config.resume_from={checkpoint}")
    assert open(os.path.join(tiny_run[0], "config.json")).read() == record  # the training record is kept
    assert json.load(open(os.path.join(tiny_run[0], "config.eval_8.json")))["evaluated"] == checkpoint
    summary = json.load(open(os.path.join(tiny_run[0], "eval.json")))
    final = json.load(open(os.path.join(tiny_run[0], "eval_final.json")))
    # Same LoRA, same prompts, same noise as the end of training.
    assert summary["reward_mean"] == pytest.approx(final["reward_mean"], rel=1e-6)
    assert os.path.exists(os.path.join(tiny_run[0], "images", "eval.png"))


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


def test_generate_pngs_lora_weights_seeds_and_the_fused_export(tmp_path, one_thread, sd):
    from diffusers import StableDiffusionPipeline

    from alignprop import mixing

    lora_a, lora_b = save_tiny_lora(tmp_path / "lora_a", seed=1), save_tiny_lora(tmp_path / "lora_b", seed=2)
    (tmp_path / "prompts.txt").write_text("# a comment\nthree apples\n")
    out, fused = tmp_path / "out", tmp_path / "fused_sd"
    texts = ["a photo of a cat", "an owl", "three apples"]  # the last one from the prompt file
    result = run_script(
        [
            "scripts/generate.py",
            "--config",
            TINY,
            "--config.seed=0",
            f"--prompt={texts[0]}",
            f"--prompt={texts[1]}",
            f"--prompt_file={tmp_path / 'prompts.txt'}",
            f"--lora={lora_a}:0",
            f"--lora={lora_b}/pytorch_lora_weights.safetensors:0.7",
            "--batch_size=2",
            f"--out={out}",
            f"--fuse={fused}",
            "--seed=5",
            "--config.sample.num_steps=3",
            "--config.sample.height=48",
        ],
        timeout=300,
        env=ONE_THREAD,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert sorted(os.listdir(out)) == ["00000.png", "00001.png", "00002.png", "prompts.json"]
    record = json.load(open(out / "prompts.json"))
    assert [(r["prompt"], r["seed"]) for r in record["images"]] == [(texts[0], 5), (texts[1], 6), (texts[2], 7)]
    assert [lora["weight"] for lora in record["settings"]["loras"]] == [0.0, 0.7]
    assert (record["settings"]["height"], record["settings"]["width"]) == (48, 32)  # the width: the model's own
    written = np.stack([np.asarray(Image.open(out / f"{i:05d}.png")) for i in range(3)])
    assert written.shape == (3, 48, 32, 3)

    # Here, with the same seeds: LoRA B alone at 0.7 gives the very same pixels (LoRA A at weight 0 adds nothing).
    pipe = sd.pipeline(tiny_components(sd))
    pipe.set_progress_bar_config(disable=True)
    settings = dict(seed=5, num_steps=3, guidance_scale=7.5, batch_size=2, height=48, width=32)
    base = mixing.generate(pipe, texts, **settings)
    mixing.load_mix(pipe.unet, sd, [(lora_b, 0.7)])
    expected = mixing.generate(pipe, texts, **settings)
    assert np.array_equal(written, np.stack([np.asarray(im) for im in pipe.numpy_to_pil(expected)]))
    assert np.abs(expected - base).max() > 1e-2  # the LoRA does change the images
    # The fused export loads with diffusers alone and gives the LoRA pipeline's images.
    reloaded = StableDiffusionPipeline.from_pretrained(str(fused))
    reloaded.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(mixing.generate(reloaded, texts, **settings), expected, atol=1e-5)  # fp32
    # Mistakes are named before any model loads.
    for args, needle in (
        ([f"--lora={tmp_path / 'no_such_run'}:0.5"], "does not exist"),
        (["--config.sample.guidance_scale=-3"], "config.sample.guidance_scale=-3.0: must be >= 0"),
        (["--config.sample.height=500"], "config.sample.height=500: must be a positive multiple"),
    ):
        result = run_script(["scripts/generate.py", "--config", TINY, "--prompt=x", *args], timeout=120)
        assert result.returncode != 0 and needle in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_soup_table_plot_grids_and_end_points(tmp_path, one_thread):
    """`scripts/evaluate_soup.py` with two LoRAs and a weighted sum; c = 1 is LoRA A and c = 0 LoRA B, each as
    the training loader loads it."""
    from alignprop import families, lora, rewards, speed
    from alignprop.evaluation import eval_items, evaluate, reward_columns
    from alignprop.prompts import make_prompt_set
    from alignprop.rollout import Rollout, SampleSpec

    reward = "aesthetic:1,compressibility:0.01"  # the table gets the total and each term
    lora_a = save_tiny_lora(tmp_path / "run_a", seed=1)
    lora_b = save_tiny_lora(tmp_path / "run_b", seed=2, rank=2, alpha=2.0)
    out = tmp_path / "out"
    result = run_script(
        [
            "scripts/evaluate_soup.py",
            "--config",
            TINY,
            f"--lora_a={lora_a}",
            f"--lora_b={lora_b}",
            f"--config.reward_fn={reward}",
            "--coefficients=0,0.5,1",
            f"--out={out}",
        ],
        timeout=300,
        env=ONE_THREAD,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    table = json.load(open(out / "soup.json"))
    assert table["columns"] == ["total", "aesthetic", "compressibility"] and table["lora_b"] == lora_b
    assert [row["coefficient"] for row in table["rows"]] == [0.0, 0.5, 1.0]
    for row in table["rows"]:
        assert row["adapter_weights"] == {"lora_a": row["coefficient"], "lora_b": 1 - row["coefficient"]}
        stats = row["rewards"]
        assert stats["total"]["mean"] == pytest.approx(
            stats["aesthetic"]["mean"] + 0.01 * stats["compressibility"]["mean"], rel=1e-5
        )
    assert sorted(os.listdir(out)) == ["grid_c0.5.png", "grid_c0.png", "grid_c1.png", "soup.json", "soup.png"]

    cfg = config(overrides={"reward_fn": reward})
    sd = families.get("sd")
    spec = rewards.parse(reward)
    reward_fn = reward_columns(
        rewards.build(spec, cfg.reward, cfg.seed, torch.device("cpu"), torch.float32), spec.columns
    )
    items = eval_items(make_prompt_set(cfg.eval_prompt_fn), cfg.sample.num_eval_samples)
    for path, rank, alpha, c in ((lora_a, 4, 8.0, 1.0), (lora_b, 2, 2.0, 0.0)):
        components = tiny_components(sd, seed=cfg.seed)
        lora.add_lora(components.denoiser, rank, alpha, sd.lora_targets)
        lora.load_into(components.denoiser, sd, path)
        rollout = Rollout(sd, components, SampleSpec.from_config(cfg.sample), speed.prepare(components, cfg.speed))
        _, _, values = evaluate(rollout, reward_fn, items, cfg.seed, cfg.sample.eval_batch_size)
        row = next(r for r in table["rows"] if r["coefficient"] == c)
        assert row["rewards"]["total"]["mean"] == pytest.approx(values[:, 0].mean().item(), rel=1e-5, abs=1e-7)
    middle = next(r for r in table["rows"] if r["coefficient"] == 0.5)["rewards"]["total"]["mean"]
    assert all(abs(middle - r["rewards"]["total"]["mean"]) > 1e-7 for r in table["rows"] if r["coefficient"] != 0.5)
    missing = str(tmp_path / "no_such_run")
    result = run_script(["scripts/evaluate_soup.py", "--config", TINY, f"--lora_a={missing}"], timeout=120)
    assert result.returncode != 0
    assert f"LoRA path {missing!r} does not exist" in result.stderr and "Traceback" not in result.stderr


def test_benchmark_smoke(tmp_path):
    result = run_script(
        [
            "scripts/benchmark.py",
            "--tiny",
            "--precision",
            "no",
            "--batch",
            "2",
            "--steps",
            "3",
            "--ks",
            "1,uniform",
            "--iters",
            "1",
            "--out",
            str(tmp_path),
        ],
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.load(open(tmp_path / "bench_alignprop.json"))
    assert set(data["k"]) == {"1", "uniform"} and data["card"] == "cpu"
    assert all(row["finite"] and row["s_per_step_median"] > 0 for row in data["k"].values())
    assert data["denoiser_fwd_cfg_batch_tflop"] > 0
    assert "| K | s/step | peak GiB | images/s |" in result.stdout
    # The one-process DDP wrapper (--ddp): gloo on the CPU, the grad steps through DistributedDataParallel.
    result = run_script(["scripts/benchmark.py", "--tiny", "--precision", "no", "--batch", "2", "--steps", "2", "--ks",
                         "1", "--iters", "1", "--ddp", "--label", "ddp", "--out", str(tmp_path)], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = json.load(open(tmp_path / "bench_ddp.json"))
    assert ddp["ddp"] and ddp["k"]["1"]["finite"] and ddp["lora_identical_across_ranks"]
    result = run_script(["scripts/benchmark.py", "--tiny", "--out", str(tmp_path)], timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "config.mixed_precision='fp16' needs a CUDA GPU" in result.stderr
