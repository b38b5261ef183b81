"""Configs: one loader (`FILE.py:EXPERIMENT` plus `--config.KEY=VALUE` overrides) for every script and test,
and one start-up check that collects each owner's checks and parses every spec string once.

Every mistake is reported before a model loads: an unknown key with its closest valid names, a value of
the wrong type, a missing config file or experiment, and every wrong value (each module owns the checks
of its keys; `check` lists all of them in one ConfigError).
"""

import ast
import dataclasses
import difflib
import importlib.util
import os

import ml_collections

from alignprop.errors import ConfigError, UserError

DEFAULT = "config/align_prop.py:aesthetic"
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
LOG_WITH = ("none", "wandb", "tensorboard")
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _experiments_module(path):
    if not os.path.isfile(path):
        where = os.path.abspath(path)
        raise ConfigError(f"--config: no config file {path!r} (looked for {where}); run from the repository root "
                          f"or give the file's path, e.g. --config config/align_prop.py:tiny")
    spec = importlib.util.spec_from_file_location(f"alignprop_config_{abs(hash(os.path.abspath(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def experiments(path):
    """name -> one-line description of the experiments of a config file."""
    module = _experiments_module(path)
    return {
        name: (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        for name, fn in module.EXPERIMENTS.items()
    }


def load(spec=DEFAULT, overrides=None):
    """The config `FILE.py:EXPERIMENT` with `overrides` ({dotted key: value or command-line text}) applied."""
    path, _, name = spec.partition(":")
    module = _experiments_module(path)
    name = name or getattr(module, "DEFAULT", "")
    if name not in module.EXPERIMENTS:
        raise ConfigError(f"--config {spec}: no experiment {name!r} in {path}; valid: {', '.join(module.EXPERIMENTS)}")
    config = module.EXPERIMENTS[name]()
    for key, value in (overrides or {}).items():
        override(config, key, value)
    return config


def flat_keys(config, prefix=""):
    out = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.extend(flat_keys(value, f"{prefix}{key}."))
        else:
            out.append(prefix + key)
    return out


def override(config, key, value):
    """Set the dotted `key`; a command-line text is parsed as the key's type. ConfigError for an unknown key
    (with the closest valid names) or a value that is not of the key's type."""
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if (
        not isinstance(node, ml_collections.ConfigDict)
        or leaf not in node
        or isinstance(node[leaf], ml_collections.ConfigDict)
    ):
        keys = flat_keys(config)
        close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join('config.' + k for k in close)}?" if close else "no key is close to it"
        raise ConfigError(f"config.{key}: no such config key; {hint} (every key is declared in config/base.py)")
    kind = node.get_type(leaf)
    if isinstance(value, str) and kind is not str:
        value = _parse(key, value, kind)
    try:
        node[leaf] = value
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.{key}={value!r}: must be of type {kind.__name__} ({e})") from None


def _parse(key, text, kind):
    """Command-line text -> a value of the key's type (ints, floats, booleans, tuples)."""
    if kind is bool:
        if text.lower() in TRUE + FALSE:
            return text.lower() in TRUE
        raise ConfigError(f"config.{key}={text!r}: must be a boolean (True or False)")
    if text.lower() == "none":
        return None
    try:
        if kind is int:
            number = float(text)
            if not number.is_integer():
                raise ValueError(text)
            return int(number)
        if kind is float:
            return float(text)
        return ast.literal_eval(text) if kind in (tuple, list, dict) else text
    except (ValueError, SyntaxError):
        raise ConfigError(f"config.{key}={text!r}: must be of type {kind.__name__}") from None


def value(config, key):
    """The value of a dotted key."""
    for part in key.split("."):
        config = config[part]
    return config


def split_command_line(argv, default=DEFAULT):
    """(config spec, {key: text} overrides, other arguments) of a command line with `--config FILE:NAME` and
    `--config.KEY=VALUE` (or `--config.KEY VALUE`)."""
    spec, overrides, rest = default, {}, []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--config" or arg.startswith("--config="):
            spec = arg.partition("=")[2] or (args.pop(0) if args else "")
        elif arg.startswith("--config."):
            key, sep, value = arg[len("--config.") :].partition("=")
            if not sep:
                if not args:
                    raise ConfigError(f"--config.{key} needs a value: --config.{key}=VALUE")
                value = args.pop(0)
            overrides[key] = value
        else:
            rest.append(arg)
    return spec, overrides, rest


def help_text(spec=DEFAULT):
    path = spec.partition(":")[0]
    try:
        names = experiments(path)
    except ConfigError as e:
        return str(e)
    lines = [f"  {name:<22} {doc}" for name, doc in names.items()]
    return (
        f"--config {path}:EXPERIMENT picks an experiment of {path}:\n"
        + "\n".join(lines)
        + "\nAny key can be overridden: --config.train.learning_rate=5e-4 (every key, with what it means, is "
        "declared in config/base.py)."
    )


@dataclasses.dataclass
class Settings:
    """What `check` parsed from a config, once: the family and model source, the reward sum, the prompt
    sets (files read), the training method (where gradients flow), the batch plan, the held-out rewards."""

    family: object
    source: object
    reward: object
    prompts: object
    eval_prompts: object
    method: object
    plan: object
    eval_rewards: object = None  # held-out rewards scored on the evaluation images only


def sampling_problems(config):
    """Problems of what sampling images needs (`config.model`, `config.sample`, `config.mixed_precision`):
    the checks of every script that renders images (training, evaluation, generation, the soup)."""
    from alignprop import families

    s = config.sample
    out = families.problems(config)
    if config.mixed_precision not in MIXED_PRECISION:
        out.append(f"config.mixed_precision={config.mixed_precision!r}: must be one of {', '.join(MIXED_PRECISION)}")
    for key, ok, why in (
        ("sample.num_steps", s.num_steps >= 1, "must be >= 1"),
        ("sample.guidance_scale", s.guidance_scale >= 0, "must be >= 0"),
        ("sample.guidance_rescale", 0 <= s.guidance_rescale <= 1, "must be in [0, 1] (0: off; ~0.7 for v-prediction)"),
        ("sample.eta", 0 <= s.eta <= 1, "must be in [0, 1]"),
        ("sample.eval_batch_size", s.eval_batch_size >= 1, "must be >= 1"),
        (
            "sample.num_eval_samples",
            s.num_eval_samples >= 1,
            "must be >= 1 (evaluation runs before and after training)",
        ),
    ):
        if not ok:
            out.append(f"config.{key}={value(config, key)!r}: {why}")
    return out


def problems(config, num_processes=1):
    """Every problem of `config`, each as `config.<key>=<value>: <what is valid>`; empty if none. Reads no
    file (the prompt sets are read by `check`)."""
    from alignprop import checkpoints, methods, plan, prompts, rewards, runs, speed, tracking, training

    out = sampling_problems(config)
    for owner in (rewards, prompts, methods, speed, training, checkpoints, runs, tracking):
        out.extend(owner.problems(config))
    if config.log_with not in LOG_WITH:
        out.append(f"config.log_with={config.log_with!r}: must be one of {', '.join(LOG_WITH)}")
    for key, ok, why in (
        ("num_epochs", config.num_epochs >= 0, "must be >= 0"),
        ("save_freq", config.save_freq >= 1, "must be >= 1"),
        ("eval_freq", config.eval_freq >= 0, "must be >= 0 (0: evaluate only at the end)"),
        ("num_checkpoint_limit", config.num_checkpoint_limit >= 1, "must be >= 1"),
    ):
        if not ok:
            out.append(f"config.{key}={value(config, key)!r}: {why}")
    try:
        plan.make_batch_plan(
            config.train.total_batch_size,
            config.train.total_samples_per_epoch,
            config.train.batch_size_per_gpu,
            num_processes,
        )
    except plan.BatchPlanError as e:
        out.append(str(e))
    return out


def check_sampling(config):
    """Raise one ConfigError listing the problems of `sampling_problems`."""
    found = sampling_problems(config)
    if found:
        raise ConfigError("Invalid config:\n  - " + "\n  - ".join(found))


def check(config, num_processes=1):
    """Check `config` for a run on `num_processes` processes and parse it: a Settings, or one ConfigError
    listing every problem. Prompt files are read here (their problems are reported with the others)."""
    from alignprop import families, methods, plan, prompts, rewards

    found = problems(config, num_processes)
    reward = held_out = None
    try:
        reward = rewards.parse(config.reward_fn)
        held_out = rewards.parse(config.eval_rewards, "eval_rewards") if config.eval_rewards else None
    except UserError:
        pass  # reported above
    sets = {}
    for key in ("prompt_fn", "eval_prompt_fn"):
        try:
            prompts.parse(config[key], key)
        except UserError:
            continue  # reported above
        try:
            needs = reward if key == "prompt_fn" or held_out is None or reward is None else reward.with_terms(held_out)
            sets[key] = prompts.load(config, key, needs)  # reads a prompt file, downloads the HPSv2 prompts
        except UserError as e:
            found.append(str(e))
    if found:
        raise ConfigError("Invalid config:\n  - " + "\n  - ".join(found))
    family, source = families.resolve(config.model)
    t = config.train
    return Settings(
        family=family,
        source=source,
        reward=reward,
        prompts=sets["prompt_fn"],
        eval_prompts=sets["eval_prompt_fn"],
        eval_rewards=held_out,
        method=methods.Method.from_config(config),
        plan=plan.make_batch_plan(t.total_batch_size, t.total_samples_per_epoch, t.batch_size_per_gpu, num_processes),
    )
