"""Rewards: one declaration per scorer module, a weighted sum of them, and the loss.

Every scorer module declares its rewards (`REWARDS`: how to build each from its own config section, what
its settings must be, what metadata each prompt must carry). A built scorer is
`fn(images, prompts, metadata) -> (rewards [B] float32, info {key: [B]})`: images float NCHW in [0, 1],
higher is better, frozen and differentiable w.r.t. the images.

`config.reward_fn` names one reward, e.g. `"hps"`, or a weighted sum `"name:weight,name:weight"`, e.g.
`"aesthetic:1.0,hps:0.5"`; every name at most once, a weight a finite nonzero number (negative minimizes
that term), a bare name weight 1, spaces ignored. It is parsed once into a `RewardSpec`, and `build`
turns that into one reward function that always returns `(total [B], components {name: [B]}, info
{"<name>/<key>": [B]})`.
"""

import dataclasses
import functools
import importlib
import math
from typing import Callable

from alignprop.errors import UserError

# Scorer modules of this package, each with a `REWARDS` tuple of declarations.
MODULES = ("aesthetic", "hps", "clipscore", "compressibility", "object_count", "imagereward", "mps", "hpsv3")
TOTAL = "total"  # the column of a weighted sum's total


@dataclasses.dataclass(frozen=True)
class Reward:
    """A reward's declaration."""

    name: str
    section: str  # its settings: config.reward.<section>
    build: Callable  # build(section, seed, device, dtype) -> scorer fn (see the module docstring)
    summary: str  # what it scores, one line
    problems: Callable = None  # problems(section, prefix) -> ["config.reward.<section>.<key>=...: why", ...]
    metadata: tuple = ()  # keys every prompt's metadata must carry
    metadata_problem: Callable = None  # metadata_problem(metadata) -> why one prompt's metadata is unusable, or None


class RewardSpecError(UserError, ValueError):
    """`config.reward_fn` is not a reward name or a valid weighted sum of rewards."""


class RewardInputError(UserError, ValueError):
    """A reward was given prompts whose metadata it cannot score; the message names the prompt."""


@functools.lru_cache(maxsize=1)
def registry():
    """name -> Reward, from every scorer module's declarations (heavy imports stay inside the builders)."""
    out = {}
    for module in MODULES:
        for reward in importlib.import_module(f"{__name__}.{module}").REWARDS:
            out[reward.name] = reward
    return out


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """`config.reward_fn` parsed: the terms (name, weight) of the sum."""

    terms: tuple

    @property
    def names(self):
        return [name for name, _ in self.terms]

    @property
    def columns(self):
        """Evaluation's reward columns: the reward itself, or the total and then each term."""
        plain = len(self.terms) == 1 and self.terms[0][1] == 1.0
        return self.names if plain else [TOTAL, *self.names]

    def with_terms(self, other):
        """These terms and those of `other` not among them (the rewards an evaluation scores)."""
        return RewardSpec(self.terms + tuple(t for t in other.terms if t[0] not in self.names))

    def metadata(self):
        """Metadata keys the prompts must carry for these rewards."""
        keys = []
        for name in self.names:
            keys.extend(k for k in registry()[name].metadata if k not in keys)
        return tuple(keys)

    def metadata_problem(self, metadata):
        """Why one prompt's metadata does not suit these rewards, or None."""
        for name in self.names:
            check = registry()[name].metadata_problem
            problem = check(metadata) if check else None
            if problem:
                return problem
        return None


def parse(spec, key="reward_fn"):
    """`"aesthetic"` -> RewardSpec((("aesthetic", 1.0),)); `"aesthetic:1,hps:0.5"` -> two terms."""
    valid = ", ".join(sorted(registry()))
    if not isinstance(spec, str) or not spec.strip():
        raise RewardSpecError(f"config.{key}={spec!r} is not a reward; valid: {valid}.")
    terms = []
    for part in spec.split(","):
        name, sep, weight_text = (s.strip() for s in part.partition(":"))
        if not name:
            raise RewardSpecError(f"config.{key}={spec!r} has an empty term; write 'name' or 'name:weight,name:weight' "
                                  f"(e.g. 'aesthetic:1.0,hps:0.5').")
        if name not in registry():
            which = "" if name == spec.strip() else f": {name!r}"  # in a sum, name the bad term
            raise RewardSpecError(f"config.{key}={spec!r}{which} is not a reward; valid: {valid}.")
        weight = 1.0
        if sep:
            try:
                weight = float(weight_text)
            except ValueError:
                weight = math.nan
            if not math.isfinite(weight) or weight == 0:
                raise RewardSpecError(f"config.{key}={spec!r}: the weight of {name!r} is {weight_text!r}; it must be a "
                                      f"finite nonzero number (e.g. '{name}:0.5').")
        if name in (n for n, _ in terms):
            raise RewardSpecError(f"config.{key}={spec!r}: {name!r} appears twice; give each reward once.")
        terms.append((name, weight))
    return RewardSpec(tuple(terms))


def problems(config):
    """Start-up checks: `config.reward_fn`, `config.eval_rewards`, `config.reward.target`, and the settings of
    each reward in use."""
    try:
        spec = parse(config.reward_fn)
        if config.eval_rewards:
            spec = spec.with_terms(parse(config.eval_rewards, "eval_rewards"))
    except RewardSpecError as e:
        return [str(e)]
    out = []
    target = config.reward.target
    if not (target is None or math.isfinite(target)):
        out.append(f"config.reward.target={target!r}: must be a finite number or unset")
    for reward in dict.fromkeys(registry()[name] for name in spec.names):
        if reward.problems:
            out.extend(reward.problems(config.reward[reward.section], f"config.reward.{reward.section}"))
    return out


def build(spec, reward_config, seed=0, device=None, dtype=None):
    """One reward function for `spec`: every scorer loaded once, the total = sum of weight x term."""
    scorers = {name: registry()[name].build(reward_config[registry()[name].section], seed, device, dtype)
               for name in spec.names}

    def reward_fn(images, prompts, metadata):
        for prompt, meta in zip(prompts, metadata):
            problem = spec.metadata_problem(meta)
            if problem:
                raise RewardInputError(f"config.reward_fn={','.join(spec.names)!r} cannot score prompt {prompt!r}: it "
                                       f"{problem}. Use a prompt set whose prompts carry {'/'.join(spec.metadata())} "
                                       f"metadata (e.g. config.prompt_fn='counting').")
        total, components, info = 0.0, {}, {}
        for name, weight in spec.terms:
            rewards, term_info = scorers[name](images, prompts, metadata)
            total = total + weight * rewards
            components[name] = rewards.detach()
            info.update({f"{name}/{k}": v for k, v in term_info.items()})
        return total, components, info

    return reward_fn


def reward_loss(rewards, target=None):
    """Rewards -> loss: maximize (−mean), or the L1 distance to `target` when one is given."""
    if target is None:
        return -rewards.mean()
    return (rewards - target).abs().mean()
