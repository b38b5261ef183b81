"""Evaluation: fixed prompts and fixed initial noise from its own generator, no gradients."""

import torch

from alignprop.models import encode_prompts, latent_shape
from alignprop.rewards import parse_reward_spec
from alignprop.rng import EVAL_STEP_STREAM, eval_generator
from alignprop.sampling import initial_latents, sample_images


def eval_items(prompt_set, num_samples):
    """The first `num_samples` (prompt, metadata) items of a prompt set, cycling in order."""
    items = prompt_set.items
    return [items[i % len(items)] for i in range(num_samples)]


@torch.no_grad()
def evaluate(unet, components, reward_fn, items, spec, seed, batch_size, device, negative_prompt_embeds, autocast,
             accelerator=None):
    """Images [N,3,H,W] in [0, 1] (on the CPU), prompts and rewards [N] for `items`, in order.

    Item i starts from its own noise, seeded by (seed, i): the same at every evaluation of a run, whatever
    the batch size or the number of processes, and the training streams are untouched. With several
    processes (`accelerator`), each renders a contiguous share of the items and every process returns all
    of them. (With eta > 0, the noise of the steps comes from a stream of each batch's first item: that
    part depends on how the items are batched.)
    """
    shape = latent_shape(components.unet, components.vae, spec.height, spec.width)
    n = len(items)
    processes = accelerator.num_processes if accelerator is not None else 1
    share = -(-n // processes)  # items per process
    batch_size = max(1, min(batch_size, share))
    first = (accelerator.process_index if accelerator is not None else 0) * share
    # Every process renders the same number of full batches: positions past the end of its share (or of
    # the items) repeat its last item, and their outputs are dropped. Then every process makes the same
    # collective calls, and a compiled UNet sees one batch shape.
    last = min(first + share, n) - 1
    images, rewards = [], []
    for start in range(0, share, batch_size):
        indices = [min(first + start + j, last) for j in range(batch_size)]
        keep = min(batch_size, share - start)
        batch_prompts, metadata = zip(*(items[i] for i in indices))
        embeds = encode_prompts(components.text_encoder, components.tokenizer, batch_prompts)
        negative = negative_prompt_embeds.expand(batch_size, -1, -1)
        sigma = components.scheduler.init_noise_sigma
        latents = torch.cat([initial_latents(1, shape, eval_generator(seed, device, i), device, init_noise_sigma=sigma)
                             for i in indices])
        with autocast():
            batch_images = sample_images(unet, components.vae, components.scheduler, embeds, negative, latents, spec,
                                         0, eval_generator(seed, device, indices[0], EVAL_STEP_STREAM))
            batch_rewards, _ = reward_fn(batch_images, list(batch_prompts), list(metadata))
        batch_images, batch_rewards = batch_images[:keep].float(), batch_rewards[:keep].float()
        if processes > 1:  # [processes x keep]: this batch of every share
            batch_images, batch_rewards = accelerator.gather(batch_images), accelerator.gather(batch_rewards)
        images.append(batch_images.cpu().unflatten(0, (processes, keep)))
        rewards.append(batch_rewards.cpu().unflatten(0, (processes, keep)))
    # [processes, share, ...] -> the items in order (the padding at the end dropped).
    images = torch.cat(images, dim=1).flatten(0, 1)[:n]
    rewards = torch.cat(rewards, dim=1).flatten(0, 1)[:n]
    return images, [prompt for prompt, _ in items], rewards


# Column of a weighted sum's total (the components follow it, under their reward names).
TOTAL = "total"


def reward_columns(spec):
    """`"aesthetic"` -> ["aesthetic"]; `"aesthetic:1,hps:20"` -> ["total", "aesthetic", "hps"]."""
    names = [name for name, _ in parse_reward_spec(spec)]
    # make_reward_fn returns a plain reward for a lone name, and a weighted sum (with components in info) otherwise.
    return names if len(names) == 1 and ":" not in spec else [TOTAL, *names]


def columns_reward_fn(reward_fn, columns):
    """A reward_fn whose rewards are [B, R], one column per entry of `columns` (what `evaluate` passes through).

    The components come from the weighted sum's info (each component's reward under its name), so every
    scorer runs once per batch.
    """

    def fn(images, prompts, metadata):
        rewards, info = reward_fn(images, prompts, metadata)
        if columns[0] != TOTAL:
            return rewards[:, None], info
        return torch.stack([rewards, *(info[name] for name in columns[1:])], dim=1), info

    return fn


def summarize(rewards, columns):
    """[N, R] rewards -> {column: {"mean", "std"}} (std 0 for a single sample)."""
    out = {}
    for j, name in enumerate(columns):
        values = rewards[:, j].double()
        std = values.std().item() if len(values) > 1 else 0.0
        out[name] = {"mean": values.mean().item(), "std": std}
    return out
