"""End to end: `scripts/evaluate_soup.py` on the tiny config with two saved LoRAs, checked against plain evaluation."""

import contextlib
import importlib.util
import json
import math
import os

import pytest
import torch
from PIL import Image

from alignprop import checkpoints, models
from conftest import REPO, run_script
from test_generation import save_tiny_lora

REWARD = "aesthetic:1,compressibility:0.01"  # a weighted sum: the table gets the total and each component
COLUMNS = ["total", "aesthetic", "compressibility"]
COEFFICIENTS = [0.0, 0.5, 1.0]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config():
    spec = importlib.util.spec_from_file_location("align_prop_config", os.path.join(REPO, "config", "align_prop.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")
    config.reward_fn = REWARD
    return config


@pytest.fixture(scope="module")
def soup(tmp_path_factory):
    root = tmp_path_factory.mktemp("soup")
    lora_a = save_tiny_lora(root / "run_a", seed=1)
    lora_b = save_tiny_lora(root / "run_b", seed=2, rank=2, alpha=2.0)
    out = root / "out"
    result = run_script(
        ["scripts/evaluate_soup.py", "--config", "config/align_prop.py:tiny", f"--lora_a={lora_a}",
         f"--lora_b={lora_b}", f"--config.reward_fn={REWARD}", "--coefficients=0,0.5,1", f"--out={out}"],
        timeout=300, env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return dict(out=out, lora_a=lora_a, lora_b=lora_b, table=json.load(open(out / "soup.json")))


def test_soup_writes_table_plot_and_grids(soup):
    table, out = soup["table"], soup["out"]
    assert table["columns"] == COLUMNS and table["lora_b"] == soup["lora_b"]
    assert [row["coefficient"] for row in table["rows"]] == COEFFICIENTS
    for row in table["rows"]:
        c = row["coefficient"]
        assert row["adapter_weights"] == {"lora_a": c, "lora_b": 1 - c}
        stats = row["rewards"]
        assert stats.keys() == set(COLUMNS)
        assert all(math.isfinite(s["mean"]) and s["std"] >= 0 for s in stats.values())
        expected_total = stats["aesthetic"]["mean"] + 0.01 * stats["compressibility"]["mean"]
        assert stats["total"]["mean"] == pytest.approx(expected_total, rel=1e-5)
        with Image.open(out / row["grid"]) as grid:
            assert grid.size[0] >= 256 and grid.size[1] >= 256  # 2x2 tiles of 128 px plus captions
    assert sorted(os.listdir(out)) == ["grid_c0.5.png", "grid_c0.png", "grid_c1.png", "soup.json", "soup.png"]
    with Image.open(out / "soup.png") as plot:
        assert plot.size[0] > 600 and plot.size[1] > 200


def test_soup_end_points_equal_each_lora_evaluated_alone(soup):
    """c = 1 is LoRA A, c = 0 is LoRA B: loaded here with the training loader, not as diffusers adapters."""
    from alignprop.evaluation import eval_items, evaluate
    from alignprop.prompts import make_prompt_set
    from alignprop.rewards import make_reward_fn
    from alignprop.sampling import SamplingSpec

    config = tiny_config()
    device = torch.device("cpu")
    reward_fn = make_reward_fn(config, device, torch.float32)
    items = eval_items(make_prompt_set(config.eval_prompt_fn), config.sample.num_eval_samples)
    s = config.sample
    spec = SamplingSpec(s.num_steps, s.guidance_scale, s.eta, s.height, s.width, decode_batch_size=1)
    for path, rank, alpha, c in ((soup["lora_a"], 4, 8.0, 1.0), (soup["lora_b"], 2, 2.0, 0.0)):
        comps = models.load_components("tiny", seed=config.seed)
        models.freeze_and_cast(comps, device, torch.float32)
        models.add_lora(comps.unet, rank=rank, alpha=alpha)
        checkpoints.load_lora(comps.unet, path)
        negative = models.encode_prompts(comps.text_encoder, comps.tokenizer, [""])
        _, _, rewards = evaluate(
            comps.unet, comps, reward_fn, items, spec, config.seed, s.eval_batch_size, device, negative,
            contextlib.nullcontext,  # fp32: no autocast
        )
        row = next(r for r in soup["table"]["rows"] if r["coefficient"] == c)
        assert row["rewards"]["total"]["mean"] == pytest.approx(rewards.mean().item(), rel=1e-5, abs=1e-7)
    middle = next(r for r in soup["table"]["rows"] if r["coefficient"] == 0.5)["rewards"]["total"]["mean"]
    ends = [r["rewards"]["total"]["mean"] for r in soup["table"]["rows"] if r["coefficient"] != 0.5]
    assert all(abs(middle - e) > 1e-7 for e in ends)  # the mix is neither end


def test_soup_names_a_missing_lora(tmp_path):
    missing = str(tmp_path / "no_such_run")
    result = run_script(
        ["scripts/evaluate_soup.py", "--config", "config/align_prop.py:tiny", f"--lora_a={missing}"], timeout=120
    )
    assert result.returncode != 0
    assert f"LoRA path {missing!r} does not exist" in result.stderr and "Traceback" not in result.stderr
