"""AlignProp training: backpropagate a differentiable reward through the DDIM chain into LoRA weights.

    accelerate launch scripts/train.py --config config/align_prop.py:aesthetic
    python scripts/train.py --config config/align_prop.py:tiny          # offline, CPU, seconds
"""

import datetime
import json
import os

import torch
from absl import app, flags, logging
from ml_collections import config_flags

from alignprop import checkpoints, models, prompts, rewards
from alignprop.errors import UserError
from alignprop.evaluation import eval_items, evaluate
from alignprop.plan import make_batch_plan
from alignprop.tracking import RunFolder, captions, image_grid, plot_rewards
from alignprop.training import make_context, train_step
from alignprop.validation import ConfigError, check_precision, validate

_CONFIG = config_flags.DEFINE_config_file("config", "config/align_prop.py:aesthetic", "Experiment config.")


def run_folder_path(config, accelerator):
    """Resumed runs continue in their own folder; new runs get `logdir/run_name` (timestamp by default)."""
    from accelerate.utils import broadcast_object_list

    if config.resume_from:
        checkpoint = checkpoints.resolve_resume(config.resume_from)
        return os.path.dirname(os.path.abspath(checkpoint)), checkpoint
    name = config.run_name or datetime.datetime.now().strftime("%Y.%m.%d_%H.%M.%S")
    path = [os.path.join(config.logdir, name)]
    broadcast_object_list(path)  # one name on every rank, whatever each one's clock says
    return path[0], None


def save_eval(run, accelerator, tag, images, eval_prompts, eval_rewards):
    if not accelerator.is_main_process:
        return
    image_grid(images, captions(eval_prompts, eval_rewards)).save(run.image_path(f"eval_{tag}.png"))
    summary = {
        "tag": tag,
        "reward_mean": eval_rewards.mean().item(),
        "reward_std": eval_rewards.std().item() if len(eval_rewards) > 1 else 0.0,
        "samples": [{"prompt": p, "reward": r} for p, r in zip(eval_prompts, eval_rewards.tolist())],
    }
    with open(os.path.join(run.path, f"eval_{tag}.json"), "w") as f:
        json.dump(summary, f, indent=2)


def main(_):
    from accelerate import Accelerator, PartialState
    from accelerate.utils import ProjectConfiguration

    config = _CONFIG.value
    state = PartialState()
    try:
        validate(config, state.num_processes)
        check_precision(config.mixed_precision, state.device)
    except ConfigError as e:
        raise SystemExit(str(e)) from None
    plan = make_batch_plan(
        config.train.total_batch_size,
        config.train.total_samples_per_epoch,
        config.train.batch_size_per_gpu,
        state.num_processes,
    )
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=plan.accumulation_steps,
        log_with=None if config.log_with == "none" else config.log_with,
    )
    run_dir, resume_checkpoint = run_folder_path(config, accelerator)
    accelerator.project_configuration = ProjectConfiguration(project_dir=run_dir, logging_dir=run_dir)
    run = RunFolder(run_dir)
    if accelerator.is_main_process:
        run.create()
        run.write_config(config, plan)
        logging.info("run folder: %s", run_dir)
        logging.info(plan.describe())
    if config.log_with != "none":
        accelerator.init_trackers(config.project_name, config=config.to_dict())
    torch.backends.cuda.matmul.allow_tf32 = config.allow_tf32
    torch.backends.cudnn.allow_tf32 = config.allow_tf32

    # Models: frozen in the inference dtype; LoRA (fp32) is the only trainable part.
    dtype = models.inference_dtype(config.mixed_precision)
    try:
        components = models.load_components(config.pretrained.model, config.pretrained.revision, seed=config.seed)
        models.check_resolution(components, config.sample.height, config.sample.width)
        models.freeze_and_cast(components, accelerator.device, dtype)
        reward_fn = rewards.make_reward_fn(config, accelerator.device, dtype)
        prompt_set = prompts.make_prompt_set(config.prompt_fn, "prompt_fn")
        eval_set = prompts.make_prompt_set(config.eval_prompt_fn, "eval_prompt_fn")
    except UserError as e:  # missing or broken weights, a prompt file: the message says what to fix
        raise SystemExit(str(e)) from None
    ctx, lora_config = make_context(config, accelerator, components, reward_fn, prompt_set, plan)
    spec, negative_prompt_embeds = ctx.spec, ctx.negative_prompt_embeds

    step, first_epoch = 0, 0
    if resume_checkpoint:
        progress = checkpoints.load_checkpoint(accelerator, resume_checkpoint)
        step, first_epoch = progress["step"], progress["epoch"]
        logging.info("resumed from %s at step %d (epoch %d)", resume_checkpoint, step, first_epoch)

    def run_eval(tag):
        items = eval_items(eval_set, config.sample.num_eval_samples)
        images, eval_prompts, eval_rewards = evaluate(
            components.unet, components, reward_fn, items, spec, config.seed, config.sample.eval_batch_size,
            accelerator.device, negative_prompt_embeds, accelerator.autocast,
        )
        save_eval(run, accelerator, tag, images, eval_prompts, eval_rewards)
        accelerator.log({"eval/reward_mean": eval_rewards.mean().item()}, step=step)
        return eval_rewards

    if step == 0:
        run_eval("initial")  # the base model (LoRA B = 0): what training is compared against
    total_steps = config.num_epochs * plan.steps_per_epoch
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=step, desc="optimizer steps", disable=not accelerator.is_main_process)
    for epoch in range(first_epoch, config.num_epochs):
        for _ in range(plan.steps_per_epoch):
            metrics = train_step(ctx)
            step += 1
            metrics_prompts = metrics.pop("prompts")
            record = {"step": step, "epoch": epoch, **metrics}
            if metrics["nonfinite"]:
                logging.warning("step %d: non-finite loss, update skipped; prompts: %s", step, metrics_prompts)
            if accelerator.is_main_process:
                run.log(record)
            accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=step)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.4g}", K=f"{metrics['k_mean']:.1f}")
        if (epoch + 1) % config.save_freq == 0 or epoch + 1 == config.num_epochs:
            checkpoints.save_checkpoint(
                accelerator, run_dir, step, {"step": step, "epoch": epoch + 1}, config.num_checkpoint_limit
            )
        if config.eval_freq and (epoch + 1) % config.eval_freq == 0 and epoch + 1 < config.num_epochs:
            run_eval(f"step{step}")
    bar.close()

    run_eval("final")
    if accelerator.is_main_process:
        checkpoints.save_lora(components.unet, lora_config, run_dir)
        records = run.read_metrics()
        if records:
            plot_rewards(records, run.image_path("reward.png"))
        logging.info("done: %d optimizer steps; run folder %s", step, run_dir)
    accelerator.end_training()


if __name__ == "__main__":
    app.run(main)
