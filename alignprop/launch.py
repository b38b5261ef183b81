"""The processes of a run: accelerate's process state for the launch a user typed, or a clear refusal.

On a machine without GPUs, `accelerate launch --multi_gpu --num_processes N` and `torchrun --nproc_per_node N`
start N processes that form one CPU (gloo) group only if accelerate is told to use the CPU; without that each
process would train on its own, into one run folder. `accelerate launch --cpu --num_processes N` starts one
process, whatever N says.
"""

import os

from alignprop.errors import UserError

CPU_LAUNCH = ("accelerate launch --multi_gpu --num_processes N scripts/train.py ... (on a machine without GPUs), "
              "or torchrun --nproc_per_node N scripts/train.py ...")


class LaunchError(UserError, RuntimeError):
    """The processes of a launch do not form the run it asked for."""


def process_state():
    """accelerate's PartialState: a CPU group when there is no GPU; a LaunchError for launches that would not
    form one group of the processes they started (or asked for)."""
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and state.num_processes != world:
        raise LaunchError(
            f"This launch started {world} processes (WORLD_SIZE={world}) that did not form one distributed group "
            f"(accelerate sees {state.num_processes}); each would train on its own. Launch them with {CPU_LAUNCH}."
        )
    asked = requested_cpu_processes()
    if asked > 1 and state.num_processes == 1:
        raise LaunchError(
            f"`accelerate launch --cpu --num_processes {asked}` starts one process, not {asked}. For {asked} CPU "
            f"processes use {CPU_LAUNCH.replace('N', str(asked))}; for one, drop --num_processes."
        )
    return state


def requested_cpu_processes():
    """N of an `accelerate launch --cpu --num_processes N` that started this process (its parent), else 0."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() != "true":
        return 0
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            args = f.read().decode(errors="replace").split("\0")
    except OSError:
        return 0
    if "launch" not in args or "--cpu" not in args:
        return 0
    for i, arg in enumerate(args):
        if arg == "--num_processes" and i + 1 < len(args) and args[i + 1].isdigit():
            return int(args[i + 1])
        if arg.startswith("--num_processes="):
            return int(arg.split("=", 1)[1]) if arg.split("=", 1)[1].isdigit() else 0
    return 0
