"""A run folder is written by one run: reuse refused, one lock, the record kept, failed starts cleaned up;
resume refuses what cannot work; launches that would not form one group are refused."""

import json
import os
import socket

import pytest

from alignprop import checkpoints, launch, runs
from alignprop.errors import ConfigError, UserError
from alignprop.runs import RunFolder, RunFolderError
from helpers import config, save_tiny_lora, train_in_process


def snapshot(folder):
    """path -> bytes of every file under `folder`: what a refused run must leave as it was."""
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                out[os.path.relpath(os.path.join(d, f), folder)] = fh.read()
    return out


@pytest.fixture
def finished_run(tmp_path):
    """A run folder as a finished tiny run leaves it (its record, metrics, checkpoints 2 and 4, the LoRA)."""
    run = tmp_path / "logs" / "done"
    cfg = config(overrides={"logdir": str(tmp_path / "logs"), "run_name": "done"})
    os.makedirs(run / "images")
    (run / "config.json").write_text(json.dumps({"config": json.loads(cfg.to_json_best_effort())}))
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    for step in (2, 4):
        save_tiny_lora(run / f"checkpoint_{step}", seed=step, rank=4, alpha=4.0)
        (run / f"checkpoint_{step}" / checkpoints.PROGRESS).write_text(json.dumps({"step": step, "epoch": step // 2}))
    save_tiny_lora(run, seed=5, rank=4, alpha=4.0)
    return run


def test_a_named_folder_that_holds_a_run_is_refused_before_loading(finished_run):
    before = snapshot(finished_run)
    cfg = config(overrides={"logdir": str(finished_run.parent), "run_name": "done"})
    (problem,) = runs.problems(cfg)
    assert f"config.run_name='done': '{finished_run}' already holds a run" in problem
    assert f"--config.resume_from={finished_run}" in problem
    with pytest.raises(UserError, match="already holds a run"):
        train_in_process(cfg)
    assert snapshot(finished_run) == before


def test_new_folders_never_reuse_a_run(tmp_path, monkeypatch):
    import datetime

    class Fixed(datetime.datetime):  # two runs that start in the same second
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 2, 3, 4, 5)

    monkeypatch.setattr(runs.datetime, "datetime", Fixed)
    first, second = RunFolder.new(str(tmp_path)), RunFolder.new(str(tmp_path))
    assert os.path.basename(first.path) == "2026.01.02_03.04.05"
    assert os.path.basename(second.path) == "2026.01.02_03.04.05_2"
    assert RunFolder.new(str(tmp_path), "2026.01.02_03.04.05").path == first.path  # an existing empty folder is free
    (tmp_path / "2026.01.02_03.04.05" / "config.json").write_text("{}")
    with pytest.raises(RunFolderError, match="already used by another run"):
        RunFolder.new(str(tmp_path), "2026.01.02_03.04.05")


def test_one_writer_per_folder(tmp_path):
    a, b = RunFolder(str(tmp_path)), RunFolder(str(tmp_path))
    a.claim()
    with pytest.raises(RunFolderError) as e:
        b.claim()
    assert f"process {os.getpid()} on {socket.gethostname()}" in str(e.value) and "written by one run" in str(e.value)
    a.release()
    b.claim()  # free again
    b.release()
    # A lock left by a process that died (a crash) is taken over.
    (tmp_path / runs.LOCK).write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname(), "since": "x"}))
    c = RunFolder(str(tmp_path))
    c.claim()
    assert json.loads((tmp_path / runs.LOCK).read_text())["pid"] == os.getpid()
    c.release()
    assert not (tmp_path / runs.LOCK).exists()


def test_a_failed_start_leaves_no_folder(tmp_path):
    run = RunFolder.new(str(tmp_path), "failed")
    run.claim()
    run.create()
    run.write_json("config.json", {})
    assert run.remove_if_unused() and not os.path.exists(run.path)
    kept = RunFolder.new(str(tmp_path), "kept")
    kept.log({"step": 1})
    assert not kept.remove_if_unused() and os.path.isdir(kept.path)


def test_a_failed_start_through_the_script_leaves_no_folder(tmp_path):
    """A broken model file passes the start-up checks (it exists) and fails to load: nothing is left."""
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x00" * 64)
    cfg = config(overrides={"logdir": str(tmp_path / "logs"), "model.source": str(bad)})
    with pytest.raises(UserError, match="is not a usable Stable Diffusion"):
        train_in_process(cfg)
    assert os.listdir(tmp_path / "logs") == []


def test_resume_refuses_changes_its_lora_cannot_take(finished_run):
    before = snapshot(finished_run)
    cfg = config(overrides={"resume_from": str(finished_run), "lora.rank": 8, "model.source": "tiny:sd2"})
    found = "\n".join(checkpoints.problems(cfg))
    assert "config.lora.rank=8: the run being resumed" in found and "has lora.rank=4" in found
    assert "config.model.source='tiny:sd2'" in found and "has model.source='tiny'" in found
    with pytest.raises(ConfigError):
        train_in_process(cfg)
    assert snapshot(finished_run) == before
    cfg = config(overrides={"resume_from": str(finished_run), "train.learning_rate": 1e-4})
    assert checkpoints.problems(cfg) == []  # a new learning rate is a change a resume can take (and records)


@pytest.mark.parametrize("name,cut", [("pytorch_lora_weights.safetensors", 100), ("progress.json", 3)])
def test_a_damaged_checkpoint_names_the_file_and_the_previous_one(finished_run, name, cut):
    damaged = finished_run / "checkpoint_4" / name
    damaged.write_bytes(damaged.read_bytes()[:cut])
    before = snapshot(finished_run)
    (problem,) = checkpoints.problems(config(overrides={"resume_from": str(finished_run)}))
    assert f"checkpoint_4 is damaged: {name} ({cut} bytes)" in problem
    assert f"--config.resume_from={finished_run / 'checkpoint_2'}" in problem
    assert snapshot(finished_run) == before


def test_checkpoint_files_are_read_without_running_them(tmp_path):
    import pickle

    import torch

    torch.save({"x": torch.zeros(3)}, tmp_path / "optimizer.bin")
    torch.save({"state": [1, 2, 3]}, tmp_path / "random_states_0.pkl")  # accelerate's .pkl files are torch.save zips
    (tmp_path / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps({"a": [1, 2, 3]}))
    for name in ("optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"):
        assert checkpoints.file_problem(str(tmp_path / name)) is None
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
        assert "cannot be read" in checkpoints.file_problem(str(tmp_path / name))


def test_wandb_without_a_key_is_named_before_loading(tmp_path, monkeypatch):
    from alignprop import tracking

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = config(overrides={"log_with": "wandb"})
    (problem,) = tracking.problems(cfg)
    assert "config.log_with='wandb': no wandb API key" in problem and "WANDB_MODE=offline" in problem
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert tracking.problems(cfg) == []
    monkeypatch.delenv("WANDB_MODE")
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    os.chmod(tmp_path / ".netrc", 0o600)
    assert tracking.problems(cfg) == []


def test_launches_that_would_not_form_one_group_are_refused(monkeypatch):
    monkeypatch.setattr(launch, "requested_cpu_processes", lambda: 0)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launch.process_state().num_processes == 1
    monkeypatch.setattr(launch, "requested_cpu_processes", lambda: 2)
    with pytest.raises(launch.LaunchError, match=r"--cpu --num_processes 2` starts one process"):
        launch.process_state()


def test_the_parent_accelerate_command_is_read(monkeypatch, tmp_path):
    cmdline = tmp_path / "cmdline"
    cmdline.write_bytes(b"python\0/usr/bin/accelerate\0launch\0--cpu\0--num_processes\x003\0scripts/train.py\0")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: real_open(cmdline if str(p).startswith("/proc/") else p,
                                                                      *a, **k))
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    assert launch.requested_cpu_processes() == 3
    monkeypatch.setenv("ACCELERATE_USE_CPU", "False")
    assert launch.requested_cpu_processes() == 0


def test_provenance_records_what_makes_a_run_reproducible():
    record = runs.provenance("config/align_prop.py:tiny", ["scripts/train.py", "--config.seed=3"])
    assert record["experiment"] == "config/align_prop.py:tiny" and record["command"][-1] == "--config.seed=3"
    assert set(record["versions"]) == {"torch", "diffusers", "transformers", "peft", "accelerate"}
    assert all(record["versions"].values()) and len(record["alignprop"]["commit"] or "x" * 40) == 40
