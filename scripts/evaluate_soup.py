"""Evaluate a LoRA soup: eval-prompt rewards (fixed noise) of LoRA A mixed with LoRA B, or with the base model.

    python scripts/evaluate_soup.py --config config/align_prop.py:evaluate \
        --lora_a logs/aesthetic/RUN --lora_b logs/hps/RUN \
        --config.reward_fn=aesthetic:1,hps:20 --config.eval_prompt_fn=hps_v2_eval --out soups/aesthetic_hps
    python scripts/evaluate_soup.py --config config/align_prop.py:evaluate --lora_a logs/aesthetic/RUN \
        --coefficients=0,0.25,0.5,0.75,1 --out soups/aesthetic_scale    # LoRA A's scale at inference (c·ΔW)
    python scripts/evaluate_soup.py --config config/align_prop.py:tiny --lora_a logs/tiny/RUN \
        --out /tmp/soup                                                  # offline CPU, tiny models

At coefficient c every adapted weight is W + c·ΔW_A + (1 − c)·ΔW_B (ΔW_B = 0 without --lora_b): c = 1 is
LoRA A, c = 0 is LoRA B or the base model. The deltas are summed, not the LoRA factors (alignprop/mixing.py).
A LoRA is a run folder, a checkpoint_N folder or a .safetensors file. Every coefficient is evaluated as
training evaluates (`alignprop.evaluation.evaluate` on `config.eval_prompt_fn`, `sample.num_eval_samples`
images, the same initial noise for every coefficient) and scored by `config.reward_fn`; a weighted sum is
also scored per term. One process (run with python, not accelerate launch). Written to --out:
    soup.json              coefficient -> adapter weights and reward mean/std per reward column
    soup.png               reward (mean ± std) against the coefficient, one panel per reward column
    grid_c<coefficient>.png the evaluation images of each coefficient, captioned with prompt and reward
"""

import argparse
import json
import logging
import os
import sys

from alignprop import config as configs, lora, mixing
from alignprop.errors import UserError

logger = logging.getLogger("alignprop.soup")


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lora_a", required=True, help="LoRA A: run folder, checkpoint_N folder or .safetensors file")
    p.add_argument("--lora_b", default="", help="LoRA B (same forms); empty: mix LoRA A with the base model")
    p.add_argument("--coefficients", default="0,0.25,0.5,0.75,1.0", help="weights c of LoRA A (1 − c for B or base)")
    p.add_argument("--out", default="", help="output folder (default: <config.logdir>/soup)")
    return p


def soup(args, config):
    paths = [args.lora_a] + ([args.lora_b] if args.lora_b else [])
    # The flags and the config first: a mistyped path fails in a second, before torch is even imported.
    files = [lora.lora_file(path) for path in paths]
    coefficients = mixing.parse_coefficients(args.coefficients.split(","))
    settings = configs.check(config, num_processes=1)

    from accelerate import Accelerator

    from alignprop import families, rewards, speed
    from alignprop.evaluation import eval_items, evaluate, reward_columns, summarize
    from alignprop.rollout import Rollout, SampleSpec
    from alignprop.tracking import captions, image_grid

    speed.resolve_precision(config)
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    out = args.out or os.path.join(config.logdir, "soup")
    os.makedirs(out, exist_ok=True)
    speed.set_torch_flags(config.speed)

    # The base model as training loads it (the same seed, so tiny runs get the same random weights).
    family, device = settings.family, accelerator.device
    components = families.load_frozen(family, settings.source, config, device)
    names = mixing.load_soup(components.denoiser, family, files)
    logger.info("LoRAs: %s", dict(zip(names, files)))
    columns = settings.reward.columns
    dtype = speed.inference_dtype(config.mixed_precision)
    reward_fn = reward_columns(rewards.build(settings.reward, config.reward, config.seed, device, dtype), columns)
    items = eval_items(settings.eval_prompts, config.sample.num_eval_samples)
    # The evaluation settings of training, so c = 1 without --lora_b matches its eval_final.
    rollout = Rollout(
        family, components, SampleSpec.from_config(config.sample), speed.prepare(family, components, config.speed)
    )

    def run_eval():
        return evaluate(rollout, reward_fn, items, config.seed, config.sample.eval_batch_size, accelerator)

    rows = []
    for c, weights, images, eval_prompts, eval_rewards in mixing.evaluate_soup(
        components.denoiser, names, coefficients, run_eval
    ):
        grid = f"grid_c{c:g}.png"
        image_grid(images, captions(eval_prompts, eval_rewards[:, 0])).save(os.path.join(out, grid))
        summary = summarize(eval_rewards, columns)
        rows.append({"coefficient": c, "adapter_weights": weights, "rewards": summary, "grid": grid})
        logger.info("c=%g: %s", c, ", ".join(f"{k} {v['mean']:.4g} ± {v['std']:.3g}" for k, v in summary.items()))

    result = {
        "lora_a": args.lora_a,
        "lora_b": args.lora_b or None,
        "coefficient": "weight of lora_a; lora_b (or the base model) gets 1 - coefficient",
        "reward_fn": config.reward_fn,
        "columns": columns,
        "eval_prompt_fn": config.eval_prompt_fn,
        "num_eval_samples": len(items),
        "rows": rows,
    }
    with open(os.path.join(out, "soup.json"), "w") as f:
        json.dump(result, f, indent=2)
    other = "LoRA B" if args.lora_b else "base model"
    mixing.plot_soup(rows, columns, os.path.join(out, "soup.png"), f"coefficient c (c × LoRA A + (1 − c) × {other})")
    logger.info("soup of %d coefficients written to %s", len(rows), out)


def main(argv):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        spec, overrides, rest = configs.split_command_line(argv, default="config/align_prop.py:evaluate")
        args = parser().parse_args(rest)
        soup(args, configs.load(spec, overrides))
    except UserError as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main(sys.argv[1:])
    from alignprop import speed

    speed.leave()  # its denoiser may have compiled: out at most 30 s after its work (speed.stop_compile_workers)
