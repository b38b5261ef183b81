"""Start-up checks of a config: every mistake a user can make is reported before any model loads."""

import importlib.util
import math
import os

from alignprop import checkpoints, prompts, rewards, truncation
from alignprop.errors import ConfigError
from alignprop.plan import BatchPlanError, make_batch_plan

MIXED_PRECISION = ("no", "fp16", "bf16")
# Downsampling factor of Stable Diffusion's VAE: image sizes must be multiples of it. The loaded VAE's own
# factor is checked again after loading (models.check_resolution).
SD_VAE_FACTOR = 8
LOG_WITH = ("none", "wandb", "tensorboard")
# torch.compile modes that work with the training step ("reduce-overhead"'s CUDA graphs do not mix with
# the checkpointed backward).
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
COMPILE_SCOPES = ("model", "blocks")
# Rewards whose full-size architecture config is not shipped with the code (config.random_weights).
RANDOM_WEIGHTS_UNSUPPORTED = ("clipscore", "pickscore", "object_count")


def _bad(config, key, why):
    """`config.<key>=<value>: <why>` for a dotted key."""
    value = config
    for part in key.split("."):
        value = value[part]
    return f"config.{key}={value!r}: {why}"


def _problems(config, num_processes):
    s, t = config.sample, config.train

    def bad(key, why):
        return _bad(config, key, why)

    out = []
    for key, check in (
        ("reward_fn", rewards.check_name),
        ("prompt_fn", prompts.check_name),
        ("eval_prompt_fn", prompts.check_name),
    ):
        try:
            check(config[key], key=key)
        except ValueError as e:
            out.append(str(e))
    try:
        needed = rewards.required_metadata(config.reward_fn)
    except ValueError:
        needed = ()  # reported above
    for key in ("prompt_fn", "eval_prompt_fn"):
        name = config[key]
        try:
            prompts.check_name(name, key=key)
        except ValueError:
            continue  # reported above
        path = prompts.local_path(name)
        if path:
            exists = os.path.isfile(path[0]) if path[1] == "file" else os.path.isdir(path[0])
            if not exists:
                out.append(bad(key, f"the prompt {path[1]} does not exist"))
            elif path[1] == "file":
                out.extend(_prompt_file_problems(config, key))
        keys = prompts.metadata_keys(name)
        missing = [k for k in needed if keys is not None and k not in keys]
        if missing:
            givers = [n for n, k in prompts.METADATA_KEYS.items() if all(m in k for m in needed)]
            out.append(
                bad(key, f"its prompts carry no {'/'.join(missing)} metadata, which config.reward_fn="
                f"{config.reward_fn!r} needs; use {' or '.join(givers)}, or a JSON prompt file with those keys")
            )
    if config.mixed_precision not in MIXED_PRECISION:
        out.append(bad("mixed_precision", f"must be one of {', '.join(MIXED_PRECISION)}"))
    if config.log_with not in LOG_WITH:
        out.append(bad("log_with", f"must be one of {', '.join(LOG_WITH)}"))
    for key, ok, why in (
        ("num_epochs", config.num_epochs >= 0, "must be >= 0"),
        ("save_freq", config.save_freq >= 1, "must be >= 1"),
        ("eval_freq", config.eval_freq >= 0, "must be >= 0 (0: evaluate only at the end)"),
        ("num_checkpoint_limit", config.num_checkpoint_limit >= 1, "must be >= 1"),
        ("sample.num_steps", s.num_steps >= 1, "must be >= 1"),
        ("sample.guidance_scale", s.guidance_scale >= 0, "must be >= 0"),
        ("sample.eta", 0 <= s.eta <= 1, "must be in [0, 1]"),
        ("sample.eval_batch_size", s.eval_batch_size >= 1, "must be >= 1"),
        ("sample.num_eval_samples", s.num_eval_samples >= 0, "must be >= 0"),
        ("train.learning_rate", t.learning_rate > 0, "must be > 0"),
        ("train.adam_beta1", 0 <= t.adam_beta1 < 1, "must be in [0, 1)"),
        ("train.adam_beta2", 0 <= t.adam_beta2 < 1, "must be in [0, 1)"),
        ("train.adam_weight_decay", t.adam_weight_decay >= 0, "must be >= 0"),
        ("train.adam_epsilon", t.adam_epsilon > 0, "must be > 0"),
        ("train.max_grad_norm", t.max_grad_norm > 0, "must be > 0"),
        ("train.loss_coeff", t.loss_coeff > 0, "must be > 0"),
        ("train.max_nonfinite_steps", t.max_nonfinite_steps >= 1, "must be >= 1"),
        ("lora.rank", config.lora.rank >= 1, "must be >= 1"),
        ("lora.alpha", config.lora.alpha > 0, "must be > 0"),
    ):
        if not ok:
            out.append(bad(key, why))
    for key in ("sample.height", "sample.width"):
        value = s[key.split(".")[1]]
        if value is not None and (value <= 0 or value % SD_VAE_FACTOR):
            lower = max(SD_VAE_FACTOR, value // SD_VAE_FACTOR * SD_VAE_FACTOR)
            out.append(
                bad(key, f"must be a positive multiple of {SD_VAE_FACTOR} pixels (Stable Diffusion's VAE factor), "
                f"e.g. {lower} or {lower + SD_VAE_FACTOR}; unset, it is the UNet's native size")
            )
    if t.truncation not in truncation.MODES:
        out.append(bad("train.truncation", f"must be one of {', '.join(truncation.MODES)}"))
    elif t.truncation == "fixed" and not 1 <= t.k <= s.num_steps:
        out.append(bad("train.k", f"must be in [1, sample.num_steps={s.num_steps}]"))
    elif t.truncation in ("uniform", "gaussian") and not 1 <= t.k_min <= t.k_max <= s.num_steps:
        out.append(
            f"config.train.k_min={t.k_min!r}, config.train.k_max={t.k_max!r}: need "
            f"1 <= k_min <= k_max <= sample.num_steps={s.num_steps}"
        )
    if not (isinstance(t.uncheckpointed_steps, int) and t.uncheckpointed_steps >= 0):
        out.append(bad("train.uncheckpointed_steps", "must be an int >= 0 (0: checkpoint every grad step)"))
    if not 0 < t.compile_memory_budget <= 1:
        out.append(bad("train.compile_memory_budget", "must be in (0, 1] (1: keep what the compiler chooses)"))
    if t.compile_mode not in COMPILE_MODES:
        out.append(bad("train.compile_mode", f"must be one of {', '.join(COMPILE_MODES)}"))
    if t.compile_scope not in COMPILE_SCOPES:
        out.append(bad("train.compile_scope", f"must be one of {', '.join(COMPILE_SCOPES)}"))
    if t.truncation == "gaussian" and t.cut_std < 0:
        out.append(bad("train.cut_std", "must be >= 0"))
    if t.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        out.append(bad("train.use_8bit_adam", "needs bitsandbytes (`pip install bitsandbytes`), or set it to False"))
    if config.resume_from:
        if not os.path.exists(config.resume_from):
            out.append(bad("resume_from", "no such run or checkpoint folder"))
        else:
            try:
                run_dir = os.path.dirname(os.path.abspath(checkpoints.resolve_resume(config.resume_from)))
            except FileNotFoundError as e:
                out.append(f"{e} Give a checkpoint_N folder or a run folder that holds one, or '' to start afresh.")
            else:
                why = _unwritable(run_dir)
                if why:
                    out.append(bad("resume_from", f"a resumed run writes to its own folder, but {why}"))
    else:
        why = _unwritable(config.logdir)
        if why:
            out.append(bad("logdir", f"run folders cannot be created there: {why}; set it to a writable folder"))
    out.extend(_reward_problems(config))
    try:
        make_batch_plan(t.total_batch_size, t.total_samples_per_epoch, t.batch_size_per_gpu, num_processes)
    except BatchPlanError as e:
        out.append(str(e))
    return out


def _prompt_file_problems(config, key):
    """Problems of the `from_file:` prompt set of config.<key>: unreadable or empty file, metadata the reward lacks."""
    try:
        prompt_set = prompts.make_prompt_set(config[key], key)
    except prompts.PromptError as e:
        return [f"config.{key}={config[key]!r}: {e}"]
    for prompt, metadata in prompt_set.items:
        try:
            problem = rewards.metadata_problem(config.reward_fn, metadata)
        except rewards.RewardSpecError:
            return []  # config.reward_fn is reported on its own
        if problem:
            return [f"config.{key}={config[key]!r}: prompt {prompt!r} {problem} "
                    f"(for config.reward_fn={config.reward_fn!r})"]
    return []


def _reward_problems(config):
    """Settings of the rewards in config.reward_fn (an unknown reward is reported on its own)."""
    try:
        names = [name for name, _ in rewards.parse_reward_spec(config.reward_fn)]
    except ValueError:
        return []
    r = config.reward
    checks = [("reward.target", r.target is None or math.isfinite(r.target), "must be a finite number or unset")]
    if "object_count" in names:
        c = r.object_count
        checks += [
            ("reward.object_count.query", isinstance(c.query, str) and "{}" in c.query,
             "must contain '{}' for the object name, e.g. 'a photo of a {}'"),
            ("reward.object_count.threshold", 0 < c.threshold < 1, "must be a probability in (0, 1), e.g. 0.1"),
            ("reward.object_count.temperature", c.temperature > 0, "must be > 0 (logit units), e.g. 0.25"),
        ]
    if {"compressibility", "incompressibility"} & set(names):
        quality = r.compressibility.quality
        checks.append(("reward.compressibility.quality", 1 <= quality <= 100, "must be a JPEG quality in [1, 100]"))
    problems = [_bad(config, key, why) for key, ok, why in checks if not ok]
    no_random = [n for n in names if n in RANDOM_WEIGHTS_UNSUPPORTED and r[n].model != "tiny"]
    if config.random_weights and no_random:
        buildable = ", ".join(n for n in rewards.REWARDS if n not in RANDOM_WEIGHTS_UNSUPPORTED)
        problems.append(
            f"config.random_weights=True: the reward(s) {', '.join(no_random)} have no built-in architecture to "
            f"initialize randomly (supported: {buildable}, or model='tiny'); set config.reward_fn to one of "
            f"those or config.random_weights=False"
        )
    return problems


def _unwritable(path):
    """Why a folder cannot be made or written at `path`, or None. Creates nothing (the run folder does, later)."""
    existing = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing!r} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing!r} is not writable by this user"
    return None


def validate(config, num_processes=1):
    """Raise ConfigError listing every problem of `config` (for a run on `num_processes` processes)."""
    problems = _problems(config, num_processes)
    if problems:
        raise ConfigError("Invalid config:\n  - " + "\n  - ".join(problems))


def check_precision(mixed_precision, device):
    """fp16/bf16 need hardware that has them: fp16 autocast and GradScaler need CUDA; bf16 needs Ampere+ or CPU."""
    import torch

    if device.type == "cpu" and mixed_precision == "fp16":
        raise ConfigError("config.mixed_precision='fp16' needs a CUDA GPU; use 'no' (or 'bf16') on the CPU.")
    if device.type == "cuda" and mixed_precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError("config.mixed_precision='bf16': this GPU has no bf16; use 'fp16'.")
