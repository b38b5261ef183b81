"""Worker for tests/test_distributed.py: a few tiny training steps on 1 or 2 processes (gloo on the CPU).

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py OUT_DIR ddp
    python tests/dist_worker.py OUT_DIR single      # 1 process, accumulation 2: the same samples
    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py OUT_DIR unwrapped  # the peers' bug

Micro-batch j of a single-process step draws from the random streams of rank j of a 2-process step, so
both runs see the same prompts, noise and K: their LoRA weights must agree. Before training, each run
also evaluates the base model on 5 prompts (shared out between the processes, in batches of 2).
"""

import importlib.util
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from alignprop import models, prompts, rewards, training  # noqa: E402
from alignprop.evaluation import eval_items, evaluate  # noqa: E402
from alignprop.plan import make_batch_plan  # noqa: E402
from alignprop.rng import RandomStreams  # noqa: E402

STEPS = 3


def main(out_dir, mode):
    from accelerate import Accelerator, PartialState

    spec = importlib.util.spec_from_file_location("cfg", os.path.join(REPO, "config", "align_prop.py"))
    cfg_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cfg_module)
    config = cfg_module.get_config("tiny")
    config.sample.num_steps = 3
    config.train.k_min, config.train.k_max = 1, 3
    config.train.total_batch_size = 4
    config.train.batch_size_per_gpu = 2

    n = PartialState(cpu=True).num_processes
    plan = make_batch_plan(4, 4, 2, n)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=plan.accumulation_steps)
    components = models.load_components("tiny", seed=0)
    models.freeze_and_cast(components, accelerator.device, torch.float32)
    reward_fn = rewards.make_reward_fn(config, accelerator.device, torch.float32)
    ctx, _ = training.make_context(config, accelerator, components, reward_fn,
                                   prompts.make_prompt_set("simple_animals"), plan)
    items = eval_items(prompts.make_prompt_set("eval_simple_animals"), 5)
    images, eval_prompts, eval_rewards = evaluate(
        components.unet, components, reward_fn, items, ctx.spec, config.seed, 2, accelerator.device,
        ctx.negative_prompt_embeds, accelerator.autocast, accelerator,
    )
    evaluation = {"images": images, "prompts": eval_prompts, "rewards": eval_rewards}
    if mode == "unwrapped":
        ctx.unet = accelerator.unwrap_model(ctx.unet)  # what the later official code and TRL do

    # Stream of micro-batch j in a single-process run = stream of rank j in a 2-process run.
    streams = [RandomStreams(config.seed, j, accelerator.device) for j in range(2)]
    seen = []
    real_micro_batch = training.micro_batch

    def micro_batch(ctx):
        j = accelerator.process_index if n == 2 else len(seen) % 2
        ctx.streams = streams[j]
        noise_state = ctx.streams.noise.get_state()
        out = real_micro_batch(ctx)
        seen.append({"prompts": out[3], "k": out[4], "noise_state": noise_state})
        return out

    training.micro_batch = micro_batch
    history = [training.train_step(ctx) for _ in range(STEPS)]
    lora = {k: v.detach().clone() for k, v in components.unet.named_parameters() if v.requires_grad}
    torch.save(
        {"lora": lora, "seen": seen, "metrics": history, "accumulation": plan.accumulation_steps, "eval": evaluation},
        os.path.join(out_dir, f"{mode}_rank{accelerator.process_index}.pt"),
    )
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
