"""Reward registry. A reward factory `make(config, device, dtype)` returns
`reward_fn(images, prompts, metadata) -> (rewards, info)`: images float NCHW in [0, 1], rewards `[B]`
float32, higher is better. `info` holds extra per-sample tensors to log (as `reward/<key>` means).
"""

import importlib

# name -> module defining `make`; modules are imported only when their reward is used (heavy imports).
REWARDS = {
    "aesthetic": "alignprop.rewards.aesthetic",
}


class UnknownRewardError(ValueError):
    pass


def check_name(name, key="reward_fn"):
    if name not in REWARDS:
        raise UnknownRewardError(f"config.{key}={name!r} is not a reward; valid: {', '.join(sorted(REWARDS))}.")


def make_reward_fn(config, device, dtype):
    check_name(config.reward_fn)
    module = importlib.import_module(REWARDS[config.reward_fn])
    return module.make(config, device, dtype)


def reward_loss(rewards, target=None):
    """Turn rewards into a loss: maximize (−mean), or L1 distance to `target` when one is given."""
    if target is None:
        return -rewards.mean()
    return (rewards - target).abs().mean()
