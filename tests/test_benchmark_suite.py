"""scripts/benchmark_suite.sh: every group's command lines are ones the scripts accept (their flags, their config
keys and values), checked without a GPU by running the suite with a `python3` that only records its arguments."""

import os
import re
import shlex
import subprocess
import sys

import pytest

from helpers import REPO

SUITE = os.path.join(REPO, "scripts", "benchmark_suite.sh")
GROUPS = re.search(r"unknown group '\$group': ([^\"]+)\" *\\\s*\"([^\"]+)\"", open(SUITE).read())


def recorded_commands(tmp_path, groups):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls"
    shim = bin_dir / "python3"
    shim.write_text(f'#!/bin/sh\nprintf "%s\\0" "$@" >> {log}\nprintf "\\n\\0" >> {log}\n')
    shim.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", OUT=str(tmp_path / "out"), PROMPTS="offline")
    result = subprocess.run(["bash", SUITE, *groups], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    calls, current = [], []
    for part in log.read_text().split("\0")[:-1]:
        if part == "\n":
            calls.append(current)
            current = []
        else:
            current.append(part)
    return calls


def all_groups():
    return (GROUPS.group(1) + " " + GROUPS.group(2)).split()


def test_the_group_list_is_found():
    assert {"sdxl", "plan15", "warm", "ddp"} <= set(all_groups())


def test_every_group_runs_commands_the_scripts_accept(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import benchmark

    from alignprop import config as configs

    calls = recorded_commands(tmp_path, all_groups())
    assert len(calls) >= len(all_groups())
    for argv in calls:
        script, *args = argv
        assert os.path.isfile(os.path.join(REPO, script)), script
        spec, overrides, rest = configs.split_command_line(args)
        parsed = benchmark.parser().parse_known_args(rest)
        # naive_sdxl.py and benchmark_naive.py take a subset of benchmark.py's flags; none takes others
        assert not parsed[1], f"{shlex.join(argv)}: unknown arguments {parsed[1]}"
        config = configs.load(spec)
        for key, value in overrides.items():
            configs.override(config, key, value)  # a wrong key or type raises ConfigError naming it
        configs.check(config, 1)  # and every start-up check (values, combinations), before any model loads


@pytest.mark.parametrize("group", ["nosuch"])
def test_an_unknown_group_lists_the_groups(tmp_path, group):
    env = dict(os.environ, OUT=str(tmp_path))
    result = subprocess.run(["bash", SUITE, group], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "unknown group 'nosuch'" in result.stderr and "plan15" in result.stderr
