"""Evaluate a LoRA soup: eval-prompt rewards (fixed noise) of LoRA A mixed with LoRA B, or with the base model.

    python scripts/evaluate_soup.py --config config/align_prop.py:evaluate \
        --lora_a logs/aesthetic/RUN --lora_b logs/hps/RUN \
        --config.reward_fn=aesthetic:1,hps:20 --config.eval_prompt_fn=hps_v2_eval --out soups/aesthetic_hps
    python scripts/evaluate_soup.py --config config/align_prop.py:evaluate --lora_a logs/aesthetic/RUN \
        --coefficients=0,0.5,1,1.5 --out soups/aesthetic_strength        # LoRA A against the base model
    python scripts/evaluate_soup.py --config config/align_prop.py:tiny --lora_a logs/tiny/RUN \
        --out /tmp/soup                                                  # offline CPU, tiny models

At coefficient c every adapted weight is W + c·ΔW_A + (1 − c)·ΔW_B (ΔW_B = 0 without --lora_b): c = 1 is
LoRA A, c = 0 is LoRA B or the base model. The deltas are summed, not the LoRA factors (alignprop/mixing.py).
A LoRA is a run folder, a checkpoint_N folder or a .safetensors file. Every coefficient is evaluated with
`alignprop.evaluation.evaluate` on `config.eval_prompt_fn` (`sample.num_eval_samples` images, the same
initial noise for every coefficient) and scored by `config.reward_fn`; a weighted sum is also scored per
component. One process (run with python, not accelerate launch). Written to --out:
    soup.json              coefficient -> adapter weights and reward mean/std per reward column
    soup.png               reward (mean ± std) against the coefficient, one panel per reward column
    grid_c<coefficient>.png the evaluation images of each coefficient, captioned with prompt and reward
"""

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

from alignprop import evaluation, mixing, soup

_CONFIG = config_flags.DEFINE_config_file("config", "config/align_prop.py:evaluate", "Experiment config.")
flags.DEFINE_string("lora_a", None, "LoRA A: run folder, checkpoint_N folder or .safetensors file.", required=True)
flags.DEFINE_string("lora_b", "", "LoRA B (same forms); empty: mix LoRA A with the base model.")
flags.DEFINE_list("coefficients", ["0", "0.25", "0.5", "0.75", "1.0"], "Weights c of LoRA A (1 − c for B or base).")
flags.DEFINE_string("out", "", "Output folder (default: <config.logdir>/soup).")
FLAGS = flags.FLAGS


def main(_):
    config = _CONFIG.value
    paths = [FLAGS.lora_a] + ([FLAGS.lora_b] if FLAGS.lora_b else [])
    try:
        # The flags first: a mistyped path fails in a second, before torch is even imported.
        files = [mixing.lora_file(path) for path in paths]
        coefficients = soup.parse_coefficients(FLAGS.coefficients)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(str(e)) from None

    from alignprop.validation import ConfigError, check_precision, validate

    try:
        validate(config, num_processes=1)
        columns = evaluation.reward_columns(config.reward_fn)
    except ValueError as e:  # ConfigError, RewardSpecError
        raise SystemExit(str(e)) from None

    from accelerate import Accelerator

    from alignprop import models, prompts, rewards
    from alignprop.evaluation import eval_items, evaluate
    from alignprop.training import sampling_spec
    from alignprop.tracking import captions, image_grid

    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    try:
        check_precision(config.mixed_precision, accelerator.device)
    except ConfigError as e:
        raise SystemExit(str(e)) from None
    out = FLAGS.out or os.path.join(config.logdir, "soup")
    os.makedirs(out, exist_ok=True)
    models.set_torch_flags(config)

    # The base model as training loads it (the same seed, so `--model tiny` runs get the same random weights).
    components, dtype = models.load_frozen_components(config, accelerator.device)
    names = soup.load_soup(components.unet, files)
    logging.info("LoRAs: %s", dict(zip(names, files)))
    reward_fn = evaluation.columns_reward_fn(rewards.make_reward_fn(config, accelerator.device, dtype), columns)
    items = eval_items(prompts.make_prompt_set(config.eval_prompt_fn, "eval_prompt_fn"), config.sample.num_eval_samples)
    # The evaluation settings of training (scripts/train.py), so c = 1 without --lora_b matches its eval_final.
    spec = sampling_spec(config)
    negative_prompt_embeds = models.encode_prompts(components.text_encoder, components.tokenizer, [""])

    def run_eval():
        return evaluate(
            components.unet, components, reward_fn, items, spec, config.seed, config.sample.eval_batch_size,
            accelerator.device, negative_prompt_embeds, accelerator.autocast, accelerator,
        )

    rows = []
    for c, weights, images, eval_prompts, eval_rewards in soup.evaluate_soup(
        components.unet, names, coefficients, run_eval
    ):
        grid = f"grid_c{c:g}.png"
        image_grid(images, captions(eval_prompts, eval_rewards[:, 0])).save(os.path.join(out, grid))
        summary = evaluation.summarize(eval_rewards, columns)
        rows.append({"coefficient": c, "adapter_weights": weights, "rewards": summary, "grid": grid})
        logging.info("c=%g: %s", c, ", ".join(f"{k} {v['mean']:.4g} ± {v['std']:.3g}" for k, v in summary.items()))

    result = {
        "lora_a": FLAGS.lora_a,
        "lora_b": FLAGS.lora_b or None,
        "coefficient": "weight of lora_a; lora_b (or the base model) gets 1 - coefficient",
        "reward_fn": config.reward_fn,
        "columns": columns,
        "eval_prompt_fn": config.eval_prompt_fn,
        "num_eval_samples": len(items),
        "rows": rows,
    }
    with open(os.path.join(out, "soup.json"), "w") as f:
        json.dump(result, f, indent=2)
    other = "LoRA B" if FLAGS.lora_b else "base model"
    soup.plot_soup(rows, columns, os.path.join(out, "soup.png"), f"coefficient c (c × LoRA A + (1 − c) × {other})")
    logging.info("soup of %d coefficients written to %s", len(rows), out)


if __name__ == "__main__":
    app.run(main)
