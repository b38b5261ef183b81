"""Reward registry. A reward factory `make(config, device, dtype)` returns
`reward_fn(images, prompts, metadata) -> (rewards, info)`: images float NCHW in [0, 1], rewards `[B]`
float32, higher is better. `info` holds extra per-sample tensors to log (as `reward/<key>` means).

`config.reward_fn` is either one reward name, e.g. `"hps"`, or a weighted sum of rewards written
`"name:weight,name:weight,..."`, e.g. `"aesthetic:1.0,hps:0.5"` (reward = 1.0 x aesthetic + 0.5 x hps).
In a sum every name appears once (its scorer is loaded once), a weight is a finite nonzero number
(negative weights minimize that component), `name` alone means weight 1, and spaces are ignored.
A sum logs each component's reward under its name and the component's own info keys as `<name>/<key>`
(e.g. `reward/hps`, `reward/compressibility/jpeg_kb`).
"""

import importlib
import math

from alignprop.errors import UserError

# name -> "module:factory"; modules are imported only when their reward is used (heavy imports).
REWARDS = {
    "aesthetic": "alignprop.rewards.aesthetic:make",
    "hps": "alignprop.rewards.hps:make_v2",
    "hps_v21": "alignprop.rewards.hps:make_v21",
    "pickscore": "alignprop.rewards.clipscore:make_pickscore",
    "clipscore": "alignprop.rewards.clipscore:make",
    "compressibility": "alignprop.rewards.compressibility:make",
    "incompressibility": "alignprop.rewards.compressibility:make_incompressibility",
    "object_count": "alignprop.rewards.object_count:make",
}

# Keys a reward needs in every prompt's metadata (the prompt set must provide them).
REQUIRED_METADATA = {
    "object_count": ("object", "count"),
}
# Check of one prompt's metadata: name -> "module:function(metadata) -> problem text or None" (imported when used).
METADATA_CHECKS = {
    "object_count": "alignprop.rewards.object_count:metadata_problem",
}


class RewardSpecError(UserError, ValueError):
    """`config.reward_fn` is not a reward name or a valid weighted sum of rewards."""


class UnknownRewardError(RewardSpecError):
    pass


def parse_reward_spec(spec, key="reward_fn"):
    """`"aesthetic"` -> [("aesthetic", 1.0)]; `"aesthetic:1,hps:0.5"` -> [("aesthetic", 1.0), ("hps", 0.5)]."""
    valid = ", ".join(sorted(REWARDS))
    if not isinstance(spec, str) or not spec.strip():
        raise UnknownRewardError(f"config.{key}={spec!r} is not a reward; valid: {valid}.")
    components = []
    for part in spec.split(","):
        name, sep, weight_text = (s.strip() for s in part.partition(":"))
        if not name:
            raise RewardSpecError(
                f"config.{key}={spec!r} has an empty component; write 'name' or 'name:weight,name:weight' "
                f"(e.g. 'aesthetic:1.0,hps:0.5')."
            )
        if name not in REWARDS:
            which = "" if name == spec.strip() else f": {name!r}"  # in a sum, name the bad component
            raise UnknownRewardError(f"config.{key}={spec!r}{which} is not a reward; valid: {valid}.")
        weight = 1.0
        if sep:
            try:
                weight = float(weight_text)
            except ValueError:
                weight = math.nan
            if not math.isfinite(weight) or weight == 0:
                raise RewardSpecError(
                    f"config.{key}={spec!r}: the weight of {name!r} is {weight_text!r}; it must be a finite "
                    f"nonzero number (e.g. '{name}:0.5')."
                )
        if name in (n for n, _ in components):
            raise RewardSpecError(f"config.{key}={spec!r}: {name!r} appears twice; give each reward once.")
        components.append((name, weight))
    return components


def check_name(name, key="reward_fn"):
    """Raise a RewardSpecError naming the config key unless `name` is a reward or a valid weighted sum."""
    parse_reward_spec(name, key)


def required_metadata(spec):
    """Metadata keys the prompts must carry for the rewards of `spec` (a name or a weighted sum)."""
    keys = []
    for name, _ in parse_reward_spec(spec):
        keys.extend(k for k in REQUIRED_METADATA.get(name, ()) if k not in keys)
    return tuple(keys)


def metadata_problem(spec, metadata):
    """Why one prompt's metadata does not suit the rewards of `spec` (e.g. a count that is not a number), or None."""
    for name, _ in parse_reward_spec(spec):
        if name in METADATA_CHECKS:
            module, attr = METADATA_CHECKS[name].split(":")
            problem = getattr(importlib.import_module(module), attr)(metadata)
            if problem:
                return problem
    return None


def _factory(name):
    module, attr = REWARDS[name].split(":")
    return getattr(importlib.import_module(module), attr)


def weighted_sum(components, reward_fns):
    """One reward_fn = sum of weight x component reward; `info` gets each component under its name."""

    def reward_fn(images, prompts, metadata):
        total, info = 0.0, {}
        for name, weight in components:
            rewards, component_info = reward_fns[name](images, prompts, metadata)
            total = total + weight * rewards
            info[name] = rewards.detach()
            info.update({f"{name}/{k}": v for k, v in component_info.items()})
        return total, info

    return reward_fn


def make_reward_fn(config, device, dtype):
    components = parse_reward_spec(config.reward_fn)
    if ":" not in config.reward_fn and len(components) == 1:
        return _factory(components[0][0])(config, device, dtype)
    reward_fns = {name: _factory(name)(config, device, dtype) for name, _ in components}
    return weighted_sum(components, reward_fns)


def reward_loss(rewards, target=None):
    """Turn rewards into a loss: maximize (−mean), or L1 distance to `target` when one is given."""
    if target is None:
        return -rewards.mean()
    return (rewards - target).abs().mean()
