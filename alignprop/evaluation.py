"""Evaluation: fixed prompts and fixed initial noise from their own generators, no gradients."""

import contextlib

import torch

from alignprop.rewards import TOTAL
from alignprop.rng import EVAL_STEP_STREAM, eval_generator


def eval_items(prompt_set, num_samples):
    """The first `num_samples` (prompt, metadata) items of a prompt set, cycling in order."""
    items = prompt_set.items
    return [items[i % len(items)] for i in range(num_samples)]


HELD_OUT = "heldout/"  # the column prefix of a held-out reward (scored on evaluation images, never trained on)


def reward_columns(reward_fn, columns, held_out=None):
    """A reward_fn (total, components, info) -> rewards [B, R], one column per entry of `columns`: the reward
    itself, or the total then each term of a weighted sum (every scorer runs once per batch); then, with
    `held_out` (another reward_fn), a `heldout/<name>` column per term of it."""

    def fn(images, prompts, metadata):
        total, components, _ = reward_fn(images, prompts, metadata)
        values = {TOTAL: total, **components}
        if held_out is not None:
            values.update({HELD_OUT + name: v for name, v in held_out(images, prompts, metadata)[1].items()})
        return torch.stack([values[name] for name in columns], dim=1)

    return fn


@torch.no_grad()
def evaluate(rollout, reward_fn, items, seed, batch_size, accelerator=None):
    """Images [N,3,H,W] in [0, 1] (on the CPU), prompts and rewards [N, R] for `items`, in order.

    `reward_fn(images, prompts, metadata) -> [B, R]` (see `reward_columns`). Item i starts from its own
    noise, seeded by (seed, i): the same at every evaluation of a run, whatever the batch size or the
    number of processes, and the training streams are untouched. With several processes (`accelerator`),
    each renders a contiguous share of the items and every process returns all of them. (With eta > 0,
    the noise of the steps comes from a stream of each batch's first item: that part depends on how the
    items are batched.)
    """
    device = rollout.device
    n = len(items)
    processes = accelerator.num_processes if accelerator is not None else 1
    share = -(-n // processes)  # items per process
    batch_size = max(1, min(batch_size, share))
    first = (accelerator.process_index if accelerator is not None else 0) * share
    # Every process renders the same number of full batches: positions past the end of its share (or of
    # the items) repeat its last item, and their outputs are dropped. Then every process makes the same
    # collective calls, and a compiled denoiser sees one batch shape.
    last = min(first + share, n) - 1
    autocast = accelerator.autocast if accelerator is not None else contextlib.nullcontext
    images, rewards = [], []
    for start in range(0, share, batch_size):
        indices = [min(first + start + j, last) for j in range(batch_size)]
        keep = min(batch_size, share - start)
        batch_prompts, metadata = (list(x) for x in zip(*(items[i] for i in indices)))
        cond = rollout.encode(batch_prompts)
        latents = torch.cat([rollout.initial_latents(1, eval_generator(seed, device, i)) for i in indices])
        with autocast():
            batch_images = rollout(cond, latents, (), eval_generator(seed, device, indices[0], EVAL_STEP_STREAM))
            batch_rewards = reward_fn(batch_images, batch_prompts, metadata)
        batch_images, batch_rewards = batch_images[:keep].float(), batch_rewards[:keep].float()
        if processes > 1:  # [processes x keep]: this batch of every share
            batch_images, batch_rewards = accelerator.gather(batch_images), accelerator.gather(batch_rewards)
        images.append(batch_images.cpu().unflatten(0, (processes, keep)))
        rewards.append(batch_rewards.cpu().unflatten(0, (processes, keep)))
    # [processes, share, ...] -> the items in order (the padding at the end dropped).
    images = torch.cat(images, dim=1).flatten(0, 1)[:n]
    rewards = torch.cat(rewards, dim=1).flatten(0, 1)[:n]
    return images, [prompt for prompt, _ in items], rewards


def summarize(rewards, columns):
    """[N, R] rewards -> {column: {"mean", "std"}} (std 0 for a single sample)."""
    out = {}
    for j, name in enumerate(columns):
        values = rewards[:, j].double()
        std = values.std().item() if len(values) > 1 else 0.0
        out[name] = {"mean": values.mean().item(), "std": std}
    return out
