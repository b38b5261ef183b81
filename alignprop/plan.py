"""The batch plan: from the paper's effective batch and a per-GPU capacity to accumulation and steps."""

import dataclasses

from alignprop.errors import UserError


class BatchPlanError(UserError, ValueError):
    """The batch sizes do not divide; the message names the keys and values that would."""


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    num_processes: int
    batch_size_per_gpu: int
    accumulation_steps: int
    total_batch_size: int
    steps_per_epoch: int
    samples_per_epoch: int

    @property
    def samples_per_process_per_epoch(self):
        return self.samples_per_epoch // self.num_processes

    def describe(self):
        return (
            f"batch plan: {self.num_processes} process(es) x {self.batch_size_per_gpu} per GPU x "
            f"{self.accumulation_steps} accumulation = {self.total_batch_size} samples per optimizer step; "
            f"{self.steps_per_epoch} optimizer step(s) per epoch of {self.samples_per_epoch} samples "
            f"({self.samples_per_process_per_epoch} per process)"
        )


def _multiples_near(value, unit):
    lower = max(unit, value // unit * unit)
    return sorted({lower, lower + unit})


def make_batch_plan(total_batch_size, total_samples_per_epoch, batch_size_per_gpu, num_processes):
    """Accumulation steps and optimizer steps per epoch; the same effective batch on any number of GPUs."""
    for key, value in (
        ("train.total_batch_size", total_batch_size),
        ("train.total_samples_per_epoch", total_samples_per_epoch),
        ("train.batch_size_per_gpu", batch_size_per_gpu),
    ):
        if not isinstance(value, int) or value <= 0:
            raise BatchPlanError(f"config.{key}={value!r} must be a positive integer.")
    per_step = batch_size_per_gpu * num_processes
    if total_batch_size % per_step:
        fits = [b for b in range(1, batch_size_per_gpu + 1) if total_batch_size % (b * num_processes) == 0]
        raise BatchPlanError(
            f"config.train.total_batch_size={total_batch_size} is not a multiple of "
            f"config.train.batch_size_per_gpu={batch_size_per_gpu} x {num_processes} process(es) = {per_step}. "
            f"Set config.train.total_batch_size to one of {_multiples_near(total_batch_size, per_step)}"
            + (f", or config.train.batch_size_per_gpu to one of {fits}" if fits else "")
            + "."
        )
    if total_samples_per_epoch % total_batch_size:
        raise BatchPlanError(
            f"config.train.total_samples_per_epoch={total_samples_per_epoch} is not a multiple of "
            f"config.train.total_batch_size={total_batch_size}. Set config.train.total_samples_per_epoch to one of "
            f"{_multiples_near(total_samples_per_epoch, total_batch_size)}."
        )
    return BatchPlan(
        num_processes=num_processes,
        batch_size_per_gpu=batch_size_per_gpu,
        accumulation_steps=total_batch_size // per_step,
        total_batch_size=total_batch_size,
        steps_per_epoch=total_samples_per_epoch // total_batch_size,
        samples_per_epoch=total_samples_per_epoch,
    )
