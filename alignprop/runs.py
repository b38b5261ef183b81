"""The run folder: written by one run, never reused by another; what makes a run reproducible is recorded in it.

- A new run gets `logdir/run_name` (a timestamp by default). A folder that holds a run is never reused: a
  given `run_name` over one is refused at start-up; a timestamp taken by another run that starts in the same
  second gets a suffix (and the log says so).
- A run holds `.lock` (process, host, start) while it writes; a second writer (another run, a resume launched
  twice, processes that did not form one distributed group) is refused while the first is alive. A lock left
  by a process that died is taken over, with a warning.
- `config.json` is the training record: the config, the batch plan, the experiment, the command line, the
  project version and commit, the library versions. A resume writes `config.resume_<step>.json` (what changed),
  an evaluation-only run `config.eval_<step>.json`; neither touches `config.json`.
- A run that fails before it wrote anything of its own (no metrics, no checkpoint) leaves no folder behind.
"""

import contextlib
import datetime
import json
import logging
import os
import shutil
import socket
import subprocess
import sys

from alignprop.errors import UserError

logger = logging.getLogger(__name__)

LOCK = ".lock"
RECORD = "config.json"
# Files that make a folder a run's (a folder with none of them is free).
RUN_FILES = (RECORD, "metrics.jsonl", "pytorch_lora_weights.safetensors")


class RunFolderError(UserError, OSError):
    """The run folder cannot be created or written (permissions, a file in the way, disk full, another run in
    it); the message names the path."""


@contextlib.contextmanager
def writing(path, what):
    """Turn an OSError while writing `path` into a RunFolderError that names the path and the config keys."""
    try:
        yield
    except OSError as e:
        where = f" (at {e.filename!r})" if e.filename and e.filename != path else ""
        raise RunFolderError(
            f"Cannot write {what} {path!r}{where}: {e.strerror or e}. The run folder is config.logdir/config.run_name "
            f"(or the folder of config.resume_from); point config.logdir at a writable folder with free space."
        ) from e


def unwritable(path):
    """Why a folder cannot be made or written at `path`, or None. Creates nothing (the run folder does, later)."""
    existing = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing!r} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing!r} is not writable by this user"
    return None


def holds_a_run(path):
    """Whether `path` is a folder with a run's files (its record, metrics, a checkpoint or a LoRA) in it."""
    if not os.path.isdir(path):
        return False
    names = os.listdir(path)
    return any(n in RUN_FILES or n.startswith("checkpoint_") for n in names)


def problems(config):
    """The run folder must be creatable and writable, and a new run's named folder must not hold another run."""
    from alignprop import checkpoints

    if config.resume_from:
        try:
            run_dir = os.path.dirname(os.path.abspath(checkpoints.resolve_resume(config.resume_from)))
        except FileNotFoundError:
            return []  # reported by checkpoints.problems
        why = unwritable(run_dir)
        return [f"config.resume_from={config.resume_from!r}: a resumed run writes to its own folder, "
                f"but {why}"] * bool(why)
    why = unwritable(config.logdir)
    if why:
        return [f"config.logdir={config.logdir!r}: run folders cannot be created there: {why}; set it to a writable "
                f"folder"]
    path = os.path.join(config.logdir, config.run_name) if config.run_name else None
    if path and holds_a_run(path):
        return [f"config.run_name={config.run_name!r}: {path!r} already holds a run (a run folder is written by one "
                f"run); give another config.run_name, leave it empty for a timestamp, or continue that run with "
                f"--config.resume_from={path}"]
    return []


def provenance(spec=None, argv=None):
    """What makes a run reproducible: the experiment, the command line, the project's version and commit, the
    versions of the libraries, the host and the start time."""
    from importlib import metadata

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "experiment": spec,
        "command": [sys.executable, *(argv if argv is not None else sys.argv)],
        "alignprop": {"version": version("alignprop"), "commit": commit},
        "versions": {n: version(n) for n in ("torch", "diffusers", "transformers", "peft", "accelerate")},
        "host": socket.gethostname(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunFolder:
    """`logdir/run_name/` with config.json, metrics.jsonl, images/ and checkpoints; written by one process."""

    def __init__(self, path):
        self.path = path
        self.metrics_path = os.path.join(path, "metrics.jsonl")
        self.claimed = False

    @classmethod
    def new(cls, logdir, run_name=""):
        """A fresh run folder (made by the main process): `run_name` (an existing empty folder is free), or a
        timestamp, with a suffix if another run took it in the same second."""
        name = run_name or datetime.datetime.now().strftime("%Y.%m.%d_%H.%M.%S")
        with writing(logdir, "the log folder"):
            os.makedirs(logdir, exist_ok=True)
        for attempt in range(1, 100):
            path = os.path.join(logdir, name if attempt == 1 else f"{name}_{attempt}")
            try:
                os.mkdir(path)
            except FileExistsError:
                if not run_name:
                    continue  # a timestamp another run took: the next suffix
                if holds_a_run(path) or os.path.exists(os.path.join(path, LOCK)):
                    raise RunFolderError(f"config.run_name={run_name!r}: {path!r} is already used by another run; "
                                         f"give another config.run_name") from None
            except OSError as e:
                with writing(path, "the run folder"):
                    raise e
            if attempt > 1:
                logger.warning("run folder %s was taken by another run; this run writes to %s", name, path)
            return cls(path)
        raise RunFolderError(f"Could not find a free run folder name like {name!r} under {logdir!r}.")

    def claim(self):
        """Take the run folder's lock; a RunFolderError if another live process holds it."""
        lock = os.path.join(self.path, LOCK)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": datetime.datetime.now().isoformat(timespec="seconds")}
        for _ in range(2):
            try:
                with writing(lock, "the run folder's lock"), open(lock, "x") as f:
                    json.dump(me, f)
                self.claimed = True
                return
            except RunFolderError as e:
                if not isinstance(e.__cause__, FileExistsError):
                    raise
            holder = self._holder(lock)
            if holder and holder.get("host") == me["host"] and not _alive(holder.get("pid", -1)):
                logger.warning("run folder %s: taking over the lock of process %s, which stopped without releasing it",
                               self.path, holder.get("pid"))
                os.remove(lock)
                continue
            raise RunFolderError(
                f"Run folder {self.path!r} is being written by another run (process {holder.get('pid')} on "
                f"{holder.get('host')} since {holder.get('since')}; {lock}). A run folder is written by one run: "
                f"wait for it, or give this run another config.run_name. Processes launched together that did not "
                f"form one distributed group each start a run of their own: see README, 'Multi-GPU'."
            )
        raise RunFolderError(f"Could not take the lock {lock!r}.")

    @staticmethod
    def _holder(lock):
        try:
            with open(lock) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def release(self):
        if self.claimed:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(self.path, LOCK))
            self.claimed = False

    def create(self):
        """Make images/ and check the folder can be written (fail now, not after hours of training)."""
        with writing(self.path, "the run folder"):
            os.makedirs(os.path.join(self.path, "images"), exist_ok=True)
            probe = os.path.join(self.path, ".write_test")
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)

    def write_json(self, name, data):
        path = os.path.join(self.path, name)
        with writing(path, f"the run's {name}"), open(path, "w") as f:
            json.dump(data, f, indent=2)

    def read_record(self):
        """The run's config.json (None if it has none)."""
        path = os.path.join(self.path, RECORD)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)

    def log(self, record):
        with writing(self.metrics_path, "the metrics file"), open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self):
        if not os.path.exists(self.metrics_path):
            return []
        with open(self.metrics_path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def image_path(self, name):
        return os.path.join(self.path, "images", name)

    def remove_if_unused(self):
        """Delete a new run's folder that holds nothing of its own yet (a start that failed); True if removed."""
        names = set(os.listdir(self.path)) if os.path.isdir(self.path) else set()
        images = os.path.join(self.path, "images")
        if names <= {RECORD, LOCK, "images"} and not (os.path.isdir(images) and os.listdir(images)):
            shutil.rmtree(self.path, ignore_errors=True)
            return True
        return False
