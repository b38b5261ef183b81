"""AlignProp training: backpropagate a differentiable reward through the sampling chain into LoRA weights.

    accelerate launch scripts/train.py --config config/align_prop.py:aesthetic
    python scripts/train.py --config config/align_prop.py:tiny          # offline, CPU, seconds
    python scripts/train.py --help                                      # the experiments
"""

import json
import logging
import os
import sys

from tqdm.auto import tqdm

from alignprop import checkpoints, config as configs, families, launch, lora, rewards, runs, speed, training
from alignprop.errors import UserError
from alignprop.evaluation import HELD_OUT, eval_items, evaluate, reward_columns, summarize
from alignprop.interrupt import StopRequest
from alignprop.runs import RunFolder
from alignprop.tracking import captions, image_grid, init_trackers, log_images, plot_rewards

logger = logging.getLogger("alignprop.train")


def open_run(config, settings, state, spec=None, argv=None):
    """The run folder (a new one, or the resumed run's), claimed by the main process, with its record.

    A new run writes config.json (the config, the batch plan, what makes it reproducible); a resume writes
    config.resume_<step>.json and an evaluation of a checkpoint config.eval_<step>.json, with what changed.
    Returns (RunFolder, checkpoint to resume from or None).
    """
    from accelerate.utils import broadcast_object_list

    checkpoint = checkpoints.resolve_resume(config.resume_from) if config.resume_from else None
    found = [None]
    if state.is_main_process:
        try:
            run = RunFolder(os.path.dirname(os.path.abspath(checkpoint))) if checkpoint else RunFolder.new(
                config.logdir, config.run_name)
            run.claim()
            found = [run.path]
        except UserError as e:
            found = [e]
    broadcast_object_list(found)  # one folder on every rank, whatever each one's clock says
    if isinstance(found[0], Exception):
        raise found[0]
    if checkpoint:  # a resume continues the run in its own folder, whatever run_name says
        config.run_name = os.path.basename(found[0])
    if not state.is_main_process:
        return RunFolder(found[0]), checkpoint
    run.create()
    record = {"config": json.loads(config.to_json_best_effort()), "batch_plan": vars(settings.plan),
              "run": runs.provenance(spec, argv)}
    if checkpoint:
        step = checkpoints.step_of(checkpoint)
        saved = (run.read_record() or {}).get("config", {})
        record["resumed_from" if config.num_epochs else "evaluated"] = checkpoint
        record["changes"] = changed_keys(saved, record["config"])
        run.write_json(f"config.{'resume' if config.num_epochs else 'eval'}_{step}.json", record)
    else:
        run.write_json(runs.RECORD, record)
    logger.info("run folder: %s", run.path)
    logger.info(settings.plan.describe())
    return run, checkpoint


def changed_keys(before, after, prefix=""):
    """{dotted key: [before, after]} of the values that differ between two config dicts (as in config.json)."""
    out = {}
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(changed_keys(a, b, f"{prefix}{key}."))
        elif a != b:
            out[prefix + key] = [a, b]
    return out


def save_eval(run, accelerator, name, step, images, eval_prompts, eval_rewards, per_reward):
    """Write `<name>.json` (rewards per prompt) and `images/<name>.png` (a captioned grid); returns the grid."""
    if not accelerator.is_main_process:
        return None
    grid = image_grid(images, captions(eval_prompts, eval_rewards))
    grid.save(run.image_path(f"{name}.png"))
    summary = {
        "step": step,
        "reward_mean": eval_rewards.mean().item(),
        "reward_std": eval_rewards.std().item() if len(eval_rewards) > 1 else 0.0,
        "per_reward": per_reward,
        "samples": [{"prompt": p, "reward": r} for p, r in zip(eval_prompts, eval_rewards.tolist())],
    }
    with open(os.path.join(run.path, f"{name}.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return grid


def train(config, spec=None, argv=None):
    """Train (or, with num_epochs=0, evaluate) as the config says; the run folder is this run's alone."""
    state = launch.process_state()
    settings = configs.check(config, state.num_processes)  # every check before any model is loaded
    speed.resolve_precision(config, state.device)
    run, resume_checkpoint = open_run(config, settings, state, spec, argv)
    try:
        run_training(config, settings, run, resume_checkpoint)
    except BaseException:
        if state.is_main_process and not resume_checkpoint and run.remove_if_unused():
            logger.info("removed the run folder %s: the run stopped before writing anything of its own", run.path)
        raise
    finally:
        run.release()


def run_training(config, settings, run, resume_checkpoint):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    plan, run_dir = settings.plan, run.path
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        kwargs_handlers=training.accelerator_handlers(config),
        gradient_accumulation_steps=plan.accumulation_steps,
        log_with=None if config.log_with == "none" else config.log_with,
        project_config=ProjectConfiguration(project_dir=run_dir, logging_dir=run_dir),
    )
    if config.log_with != "none":
        init_trackers(accelerator, config, run_dir)
    speed.set_torch_flags(config.speed)

    # Models: frozen in the inference dtype; LoRA (fp32) is the only trainable part.
    device = accelerator.device
    components = families.load_frozen(settings.family, settings.source, config, device)
    reward_fn = rewards.build(
        settings.reward, config.reward, config.seed, device, speed.inference_dtype(config.mixed_precision)
    )
    cache = speed.compile_cache_file(config)
    speed.load_compile_cache(cache)
    trainer, lora_config = training.make_trainer(config, settings, accelerator, components, reward_fn)
    logger.info(speed.describe(config, accelerator.device, trainer.memory_plan))

    step = 0
    if resume_checkpoint:
        step = checkpoints.load_checkpoint(accelerator, resume_checkpoint)["step"]
        logger.info("resumed from %s at optimizer step %d", resume_checkpoint, step)

    columns = settings.reward.columns  # the reward, or a sum's total and then each term
    held_out = None
    if settings.eval_rewards:  # rewards never trained on, scored on the evaluation images (reward hacking shows there)
        spec = rewards.RewardSpec(tuple(t for t in settings.eval_rewards.terms if t[0] not in settings.reward.names))
        dtype = speed.inference_dtype(config.mixed_precision)
        held_out = rewards.build(spec, config.reward, config.seed, device, dtype)
        columns = columns + [HELD_OUT + name for name in spec.names]
    eval_reward_fn = reward_columns(reward_fn, columns, held_out)
    items = eval_items(settings.eval_prompts, config.sample.num_eval_samples)

    def run_eval(name):
        images, eval_prompts, eval_rewards = evaluate(
            trainer.rollout, eval_reward_fn, items, config.seed, config.sample.eval_batch_size, accelerator
        )
        per_reward = summarize(eval_rewards, columns)
        grid = save_eval(run, accelerator, name, step, images, eval_prompts, eval_rewards[:, 0], per_reward)
        accelerator.log({f"eval/{k}_mean": v["mean"] for k, v in per_reward.items()}, step=step)
        log_images(accelerator, "eval/images", grid, step)

    if config.num_epochs == 0:  # evaluation only: the checkpoint in resume_from, or the base model
        run_eval("eval")
        if cache and accelerator.is_main_process:
            speed.save_compile_cache(cache)
        accelerator.end_training()
        return

    def save(step):
        epoch = step // plan.steps_per_epoch
        return checkpoints.save_checkpoint(
            accelerator, run_dir, step, {"step": step, "epoch": epoch}, config.num_checkpoint_limit
        )

    if step == 0:
        run_eval("eval_initial")  # the base model (LoRA B = 0): what training is compared against
    total_steps = config.num_epochs * plan.steps_per_epoch
    stop = StopRequest()
    nonfinite_streak = 0
    warned_zero_gradient = False  # warned once per run
    bar = tqdm(total=total_steps, initial=step, desc="optimizer steps", disable=not accelerator.is_main_process)
    while step < total_steps:
        keep_samples = bool(config.log_image_freq) and (step + 1) % config.log_image_freq == 0
        metrics, samples = training.train_step(trainer, keep_samples=keep_samples)
        step += 1
        if cache and accelerator.is_main_process:
            speed.save_compile_cache(cache)  # after this process's first step: evaluation's and training's graphs
            cache = None
        if keep_samples and accelerator.is_main_process:
            grid = image_grid(samples.images, captions(samples.image_prompts, samples.rewards))
            grid.save(run.image_path(f"train_step{step}.png"))
            log_images(accelerator, "train/samples", grid, step)
        record = {"step": step, "epoch": (step - 1) // plan.steps_per_epoch, **metrics}
        if accelerator.is_main_process:
            run.log(record)
        accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=step)
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward_mean']:.4g}", K=f"{metrics['k_mean']:.1f}")

        nonfinite_streak = nonfinite_streak + 1 if metrics["nonfinite"] else 0
        if metrics["nonfinite"]:
            logger.warning("step %d: non-finite loss or gradients, update skipped; prompts: %s", step, samples.prompts)
        if not warned_zero_gradient and (message := training.zero_gradient_warning(metrics)):
            logger.warning("step %d: %s (Warned once per run.)", step, message)
            warned_zero_gradient = True
        if nonfinite_streak >= config.train.max_nonfinite_steps:
            # Skipped steps change no weights: the state saved now is the last good one.
            path = save(step)
            raise SystemExit(
                f"Stopped: {nonfinite_streak} consecutive optimizer steps with a non-finite loss or gradients "
                f"(config.train.max_nonfinite_steps={config.train.max_nonfinite_steps}). The last good state is "
                f"in {path}. Lower the learning rate, use bf16 instead of fp16, or check the reward."
            )
        saved = False
        if step % plan.steps_per_epoch == 0:
            epoch = step // plan.steps_per_epoch
            if epoch % config.save_freq == 0 or step == total_steps:
                save(step)
                saved = True
            if config.eval_freq and epoch % config.eval_freq == 0 and step < total_steps:
                run_eval(f"eval_step{step}")
        if stop.requested(accelerator):
            path = checkpoints.checkpoint_path(run_dir, step) if saved else save(step)
            bar.close()
            logger.warning(
                "interrupted at step %d; state saved in %s; resume with --config.resume_from=%s", step, path, run_dir
            )
            accelerator.end_training()
            sys.exit(stop.exit_code())
    bar.close()
    stop.restore()

    run_eval("eval_final")
    peaks = training.gpu_peaks_gib(accelerator)
    if peaks is not None:
        logger.info("peak GPU memory per process (GiB): %s", ", ".join(f"{p:.2f}" for p in peaks))
    if accelerator.num_processes > 1:
        if training.lora_in_sync(accelerator, trainer.params):
            logger.info("LoRA weights are bit-identical on all %d processes", accelerator.num_processes)
        else:
            logger.error("LoRA weights differ between processes: gradients were not synchronized")
    if accelerator.is_main_process:
        lora.save_lora(settings.family, components.denoiser, lora_config, run_dir)
        plot_rewards(run.read_metrics(), run.image_path("reward.png"))
        logger.info("done: %d optimizer steps; run folder %s", step, run_dir)
    # Every process done before any tears its process group down: a rank destroying gloo's group while another
    # still writes aborted once in CI ("terminate called without an active exception").
    accelerator.wait_for_everyone()
    accelerator.end_training()


def main(argv):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        spec, overrides, rest = configs.split_command_line(argv)
        if any(arg in ("-h", "--help") for arg in rest):
            print(__doc__ + "\n" + configs.help_text(spec))
            return
        checking = rest[:2] if rest[:1] == ["--check"] and len(rest) >= 2 and rest[1].isdigit() else []
        if rest[len(checking):]:
            raise configs.ConfigError(
                f"unknown argument(s) {' '.join(rest[len(checking):])}; this script takes --config FILE:EXPERIMENT "
                f"and --config.KEY=VALUE (see --help), and --check N (check a run on N processes, load nothing)"
            )
        config = configs.load(spec, overrides)
        if checking:
            logger.info("config OK: %s", configs.check(config, int(checking[1])).plan.describe())
            return
        train(config, spec, sys.argv)
    except UserError as e:  # a bad config value, missing weights, a prompt file, the run folder: say what to fix
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main(sys.argv[1:])
    speed.leave()
