"""Worker for tests/test_distributed.py: a few tiny training steps on 1 or 2 processes (gloo on the CPU).

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py OUT_DIR ddp
    python tests/dist_worker.py OUT_DIR single      # 1 process, accumulation 2: the same samples
    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py OUT_DIR unwrapped  # the peers' bug

Micro-batch j of a single-process step draws from the random streams of rank j of a 2-process step, so
both runs see the same prompts, noise and K: their LoRA weights must agree. Before training, each run
also evaluates the base model on 5 prompts (shared out between the processes, in batches of 2).
"""

import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from alignprop import config as configs, families, prompts, rewards, training  # noqa: E402
from alignprop.evaluation import eval_items, evaluate, reward_columns  # noqa: E402
from alignprop.rng import RandomStreams  # noqa: E402

STEPS = 3


def main(out_dir, mode):
    from accelerate import Accelerator, PartialState

    n = PartialState(cpu=True).num_processes
    config = configs.load(os.path.join(REPO, "config", "align_prop.py:tiny"), {
        "sample.num_steps": 3, "train.k_min": 1, "train.k_max": 3, "train.total_batch_size": 4,
        "train.total_samples_per_epoch": 4, "train.batch_size_per_gpu": 2})
    settings = configs.check(config, n)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=settings.plan.accumulation_steps,
                              kwargs_handlers=training.accelerator_handlers(config))  # as scripts/train.py
    components = families.load_frozen(settings.family, settings.source, config, accelerator.device)
    reward_fn = rewards.build(settings.reward, config.reward, config.seed, accelerator.device, torch.float32)
    trainer, _ = training.make_trainer(config, settings, accelerator, components, reward_fn)
    items = eval_items(prompts.make_prompt_set("eval_simple_animals"), 5)
    images, eval_prompts, eval_rewards = evaluate(trainer.rollout, reward_columns(reward_fn, ["aesthetic"]), items,
                                                  config.seed, 2, accelerator)
    evaluation = {"images": images, "prompts": eval_prompts, "rewards": eval_rewards[:, 0]}
    if n == 2:  # DDP as training wraps it: no buffer broadcast at each grad-step call
        assert trainer.rollout.train_denoiser.broadcast_buffers is False
    if mode == "unwrapped":
        trainer.rollout.train_denoiser = accelerator.unwrap_model(trainer.rollout.train_denoiser)  # the peers' bug

    # Stream of micro-batch j in a single-process run = stream of rank j in a 2-process run.
    streams = [RandomStreams(config.seed, j, accelerator.device) for j in range(2)]
    seen = []
    real_micro_batch = training.micro_batch

    def micro_batch(trainer):
        j = accelerator.process_index if n == 2 else len(seen) % 2
        trainer.streams = streams[j]
        noise_state = trainer.streams.noise.get_state()
        batch = real_micro_batch(trainer)
        seen.append({"prompts": batch.prompts, "k": batch.k, "noise_state": noise_state})
        return batch

    training.micro_batch = micro_batch
    history = [training.train_step(trainer)[0] for _ in range(STEPS)]
    lora = {k: v.detach().clone() for k, v in components.denoiser.named_parameters() if v.requires_grad}
    torch.save(
        {"lora": lora, "seen": seen, "metrics": history, "accumulation": settings.plan.accumulation_steps,
         "eval": evaluation},
        os.path.join(out_dir, f"{mode}_rank{accelerator.process_index}.pt"),
    )
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
