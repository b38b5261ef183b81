"""Evaluation: fixed prompts and fixed initial noise from its own generator, no gradients."""

import torch

from alignprop.models import encode_prompts, latent_shape
from alignprop.rewards import parse_reward_spec
from alignprop.rng import eval_generator
from alignprop.sampling import initial_latents, sample_images


def eval_items(prompt_set, num_samples):
    """The first `num_samples` (prompt, metadata) items of a prompt set, cycling in order."""
    items = prompt_set.items
    return [items[i % len(items)] for i in range(num_samples)]


@torch.no_grad()
def evaluate(unet, components, reward_fn, items, spec, seed, batch_size, device, negative_prompt_embeds, autocast):
    """Images [N,3,H,W] in [0, 1] (on the CPU), prompts and rewards [N] for `items`, in order.

    The noise comes from a generator seeded anew at every call: evaluations of one run are comparable,
    and the training streams are untouched.
    """
    generator = eval_generator(seed, device)
    shape = latent_shape(components.unet, components.vae, spec.height, spec.width)
    # A short last batch is padded (with its last item, outputs dropped) to the size of the others: a
    # compiled UNet then runs one graph instead of compiling another for the odd size.
    batch_size = max(1, min(batch_size, len(items)))
    images, prompts, rewards = [], [], []
    for start in range(0, len(items), batch_size):
        chunk = list(items[start : start + batch_size])
        n = len(chunk)
        batch_prompts, metadata = zip(*(chunk + chunk[-1:] * (batch_size - n)))
        embeds = encode_prompts(components.text_encoder, components.tokenizer, batch_prompts)
        negative = negative_prompt_embeds.expand(batch_size, -1, -1)
        latents = initial_latents(
            batch_size, shape, generator, device, init_noise_sigma=components.scheduler.init_noise_sigma
        )
        with autocast():
            batch_images = sample_images(unet, components.vae, components.scheduler, embeds, negative, latents, spec, 0, generator)
            batch_rewards, _ = reward_fn(batch_images, list(batch_prompts), list(metadata))
        images.append(batch_images[:n].float().cpu())
        rewards.append(batch_rewards[:n].float().cpu())
        prompts.extend(batch_prompts[:n])
    return torch.cat(images), prompts, torch.cat(rewards)


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
