"""The run folder: created and probed at start-up; a write that fails names the path and config.logdir."""

import os

import pytest

from alignprop.errors import UserError
from alignprop.runs import RunFolder, RunFolderError


def test_create_makes_the_folder_and_leaves_no_probe(tmp_path):
    run = RunFolder(str(tmp_path / "logs" / "run"))
    run.create()
    assert sorted(os.listdir(run.path)) == ["images"]
    run.log({"step": 1})
    assert run.read_metrics() == [{"step": 1}]


def test_unwritable_place_names_the_path_and_config_logdir(tmp_path):
    # Tests run as root, which writes through permission bits: a regular file in the path stops root too.
    (tmp_path / "afile").write_text("x")
    path = str(tmp_path / "afile" / "sub" / "run")
    with pytest.raises(RunFolderError) as e:
        RunFolder(path).create()
    message = str(e.value)
    assert f"Cannot write the run folder {path!r}" in message and "Not a directory" in message
    assert "config.logdir" in message
    assert isinstance(e.value, UserError) and isinstance(e.value, OSError)


def test_disk_full_names_the_file(tmp_path):
    run = RunFolder(str(tmp_path / "run"))
    run.create()
    run.metrics_path = "/dev/full"  # every write fails with ENOSPC, as on a full disk
    with pytest.raises(RunFolderError, match=r"Cannot write the metrics file '/dev/full': No space left on device"):
        run.log({"step": 1})
