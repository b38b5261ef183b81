"""The scripts end to end in subprocesses, offline on the CPU (the slow tier): training and what it writes,
exact resume, evaluation only, generation and the soup evaluation (the benchmark: test_scripts_benchmark.py;
failures, interrupts and launches: test_scripts_launch.py)."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import TINY, config, records, run_script, save_tiny_lora, tiny_components, train

pytestmark = pytest.mark.slow

COMPARED = ("loss", "reward_mean", "reward_std", "k_mean", "grad_norm")
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # bitwise-comparable numbers with the in-process side, and faster


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
        rollout = Rollout(sd, components, SampleSpec.from_config(cfg.sample), speed.prepare(sd, components, cfg.speed))
        _, _, values = evaluate(rollout, reward_fn, items, cfg.seed, cfg.sample.eval_batch_size)
        row = next(r for r in table["rows"] if r["coefficient"] == c)
        assert row["rewards"]["total"]["mean"] == pytest.approx(values[:, 0].mean().item(), rel=1e-5, abs=1e-7)
    middle = next(r for r in table["rows"] if r["coefficient"] == 0.5)["rewards"]["total"]["mean"]
    assert all(abs(middle - r["rewards"]["total"]["mean"]) > 1e-7 for r in table["rows"] if r["coefficient"] != 0.5)
    missing = str(tmp_path / "no_such_run")
    result = run_script(["scripts/evaluate_soup.py", "--config", TINY, f"--lora_a={missing}"], timeout=120)
    assert result.returncode != 0
    assert f"LoRA path {missing!r} does not exist" in result.stderr and "Traceback" not in result.stderr
