"""Random streams with owners: one generator per purpose, seeded from (seed, process index, purpose).

Nothing here touches the global RNG, so evaluation cannot disturb training noise and every rank draws
different noise, prompts and truncation points.
"""

import contextlib
import random

import numpy as np
import torch

STREAMS = ("noise", "truncation", "prompts")
EVAL_STREAM = 1_000  # evaluation's initial noise, one generator per item
EVAL_STEP_STREAM = 1_001  # evaluation's per-step noise (eta > 0), one generator per batch
LORA_STREAM = 2_000  # the LoRA's initial weights (lora_A; lora_B starts at zero)


def derive_seed(seed, process_index, stream_id):
    """A 63-bit seed, independent across (seed, process, stream), via numpy's SeedSequence."""
    return int(np.random.SeedSequence([seed, process_index, stream_id]).generate_state(2, np.uint64)[0] >> 1)


class RandomStreams:
    """Generators of one process: `noise` (on the device), `truncation` (CPU), `prompts` (Python RNG)."""

    def __init__(self, seed, process_index, device):
        self.noise = torch.Generator(device=device).manual_seed(derive_seed(seed, process_index, 0))
        self.truncation = torch.Generator().manual_seed(derive_seed(seed, process_index, 1))
        self.prompts = random.Random(derive_seed(seed, process_index, 2))

    def state_dict(self):
        return {
            "noise": self.noise.get_state(),
            "truncation": self.truncation.get_state(),
            "prompts": self.prompts.getstate(),
        }

    def load_state_dict(self, state):
        self.noise.set_state(state["noise"])
        self.truncation.set_state(state["truncation"])
        self.prompts.setstate(state["prompts"])


def eval_generator(seed, device, item=0, stream=EVAL_STREAM):
    """A fresh generator for evaluation item `item` (in the place of a process index): the same noise
    for that item at every evaluation of a run, however the items are batched or shared out."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, item, stream))


@contextlib.contextmanager
def seeded(seed, device=None):
    """Random initialization inside the block draws from `seed`; the global RNGs are restored afterwards.

    Every builder of random weights (tiny and full-size models, reward towers, the LoRA) runs inside one,
    so building a model never moves the RNG state of the caller. `device`: a CUDA device whose generator
    is seeded and restored too (models initialized on the GPU).
    """
    device = torch.device(device) if device is not None else None
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if (
        device is not None and device.type == "cuda") else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield
