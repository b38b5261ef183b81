"""AlignProp training: backpropagate a differentiable reward through the DDIM chain into LoRA weights.

    accelerate launch scripts/train.py --config config/align_prop.py:aesthetic
    python scripts/train.py --config config/align_prop.py:tiny          # offline, CPU, seconds
"""

import datetime
import json
import os
import sys

from absl import app, logging
from ml_collections import config_flags
from tqdm.auto import tqdm

from alignprop import checkpoints, models, prompts, rewards
from alignprop.errors import UserError
from alignprop.evaluation import columns_reward_fn, eval_items, evaluate, reward_columns, summarize
from alignprop.interrupt import StopRequest
from alignprop.plan import make_batch_plan
from alignprop.tracking import RunFolder, captions, flat_config, image_grid, log_images, plot_rewards
from alignprop.training import gpu_peaks_gib, lora_in_sync, make_context, train_step, zero_gradient_warning
from alignprop.validation import check_precision, validate

_CONFIG = config_flags.DEFINE_config_file("config", "config/align_prop.py:aesthetic", "Experiment config.")


def run_folder_path(config):
    """Resumed runs continue in their own folder; new runs get `logdir/run_name` (timestamp by default)."""
    from accelerate.utils import broadcast_object_list

    if config.resume_from:
        checkpoint = checkpoints.resolve_resume(config.resume_from)
        return os.path.dirname(os.path.abspath(checkpoint)), checkpoint
    name = config.run_name or datetime.datetime.now().strftime("%Y.%m.%d_%H.%M.%S")
    path = [os.path.join(config.logdir, name)]
    broadcast_object_list(path)  # one name on every rank, whatever each one's clock says
    return path[0], None


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


def main(_):
    try:
        train(_CONFIG.value)
    except UserError as e:  # a bad config value, missing weights, a prompt file, the run folder: say what to fix
        raise SystemExit(str(e)) from None


def train(config):
    from accelerate import Accelerator, PartialState
    from accelerate.utils import ProjectConfiguration

    state = PartialState()
    validate(config, state.num_processes)  # every check before any model is loaded
    check_precision(config.mixed_precision, state.device)
    plan = make_batch_plan(
        config.train.total_batch_size,
        config.train.total_samples_per_epoch,
        config.train.batch_size_per_gpu,
        state.num_processes,
    )
    run_dir, resume_checkpoint = run_folder_path(config)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=plan.accumulation_steps,
        log_with=None if config.log_with == "none" else config.log_with,
        project_config=ProjectConfiguration(project_dir=run_dir, logging_dir=run_dir),
    )
    run = RunFolder(run_dir)
    if accelerator.is_main_process:
        run.create()
        run.write_config(config, plan)
        logging.info("run folder: %s", run_dir)
        logging.info(plan.describe())
    if config.log_with != "none":
        # wandb honours WANDB_MODE=offline/disabled; its files go to the run folder unless WANDB_DIR is set.
        os.environ.setdefault("WANDB_DIR", run_dir)
        accelerator.init_trackers(config.project_name, config=flat_config(config))
    models.set_torch_flags(config)

    # Models: frozen in the inference dtype; LoRA (fp32) is the only trainable part.
    components, dtype = models.load_frozen_components(config, accelerator.device)
    reward_fn = rewards.make_reward_fn(config, accelerator.device, dtype)
    prompt_set = prompts.make_prompt_set(config.prompt_fn, "prompt_fn")
    eval_set = prompts.make_prompt_set(config.eval_prompt_fn, "eval_prompt_fn")
    ctx, lora_config = make_context(config, accelerator, components, reward_fn, prompt_set, plan)
    spec, negative_prompt_embeds = ctx.spec, ctx.negative_prompt_embeds

    step = 0
    if resume_checkpoint:
        step = checkpoints.load_checkpoint(accelerator, resume_checkpoint)["step"]
        logging.info("resumed from %s at optimizer step %d", resume_checkpoint, step)

    columns = reward_columns(config.reward_fn)
    eval_reward_fn = columns_reward_fn(reward_fn, columns)  # [N, R]: the reward, then each component of a sum

    def run_eval(name):
        items = eval_items(eval_set, config.sample.num_eval_samples)
        images, eval_prompts, eval_rewards = evaluate(
            components.unet, components, eval_reward_fn, items, spec, config.seed, config.sample.eval_batch_size,
            accelerator.device, negative_prompt_embeds, accelerator.autocast, accelerator,
        )
        per_reward = summarize(eval_rewards, columns)
        grid = save_eval(run, accelerator, name, step, images, eval_prompts, eval_rewards[:, 0], per_reward)
        accelerator.log({f"eval/{k}_mean": v["mean"] for k, v in per_reward.items()}, step=step)
        log_images(accelerator, "eval/images", grid, step)

    if config.num_epochs == 0:  # evaluation only: the checkpoint in resume_from, or the base model
        run_eval("eval")
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
    warned_zero_gradient = False
    bar = tqdm(total=total_steps, initial=step, desc="optimizer steps", disable=not accelerator.is_main_process)
    while step < total_steps:
        keep_samples = bool(config.log_image_freq) and (step + 1) % config.log_image_freq == 0
        metrics = train_step(ctx, keep_samples=keep_samples)
        step += 1
        step_prompts = metrics.pop("prompts")
        if keep_samples:
            samples = metrics.pop("samples")
            if accelerator.is_main_process:
                grid = image_grid(samples["images"], captions(samples["prompts"], samples["rewards"]))
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
            logging.warning("step %d: non-finite loss or gradients, update skipped; prompts: %s", step, step_prompts)
        if not warned_zero_gradient and (message := zero_gradient_warning(metrics)):
            logging.warning("step %d: %s (Warned once per run.)", step, message)
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
            logging.warning("interrupted at step %d; state saved in %s; resume with --config.resume_from=%s",
                            step, path, run_dir)
            accelerator.end_training()
            sys.exit(stop.exit_code())
    bar.close()
    stop.restore()

    run_eval("eval_final")
    peaks = gpu_peaks_gib(accelerator)
    if peaks is not None:
        logging.info("peak GPU memory per process (GiB): %s", ", ".join(f"{p:.2f}" for p in peaks))
    if accelerator.num_processes > 1:
        if lora_in_sync(accelerator, ctx.params):
            logging.info("LoRA weights are bit-identical on all %d processes", accelerator.num_processes)
        else:
            logging.error("LoRA weights differ between processes: gradients were not synchronized")
    if accelerator.is_main_process:
        checkpoints.save_lora(components.unet, lora_config, run_dir)
        plot_rewards(run.read_metrics(), run.image_path("reward.png"))
        logging.info("done: %d optimizer steps; run folder %s", step, run_dir)
    accelerator.end_training()


if __name__ == "__main__":
    app.run(main)
