"""The training step: only LoRA changes, K drawn once per rollout, non-finite losses skipped."""

import ml_collections
import pytest
import torch

import alignprop.training as training
from alignprop.models import add_lora, encode_prompts, trainable_parameters
from alignprop.prompts import make_prompt_set
from alignprop.rng import RandomStreams
from alignprop.sampling import SamplingSpec


def _train_config(**overrides):
    t = ml_collections.ConfigDict(
        dict(
            truncation="uniform", k=1, k_min=1, k_max=4, cut_mean=2.0, cut_std=1.0, loss_coeff=1.0,
            max_grad_norm=5.0, learning_rate=1e-2, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=0.1,
            adam_epsilon=1e-8, use_8bit_adam=False, checkpoint_reward=False,
        )
    )
    t.update(overrides)
    return t


def _constant_reward(images, prompts, metadata):
    w = torch.randn(images.shape[1:], generator=torch.Generator().manual_seed(3))
    return (images * w).flatten(1).mean(1), {"brightness": images.mean(dim=(1, 2, 3))}


@pytest.fixture
def make_ctx(components):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    def make(reward_fn=_constant_reward, accumulation=2, **train_overrides):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
        lora_config = add_lora(components.unet, rank=4, alpha=4.0)
        params = trainable_parameters(components.unet)
        train = _train_config(**train_overrides)
        optimizer = training.build_optimizer(params, train)
        unet, optimizer = accelerator.prepare(components.unet, optimizer)
        ctx = training.TrainContext(
            accelerator=accelerator,
            unet=unet,
            components=components,
            reward_fn=reward_fn,
            prompt_set=make_prompt_set("simple_animals"),
            optimizer=optimizer,
            params=params,
            spec=SamplingSpec(num_steps=4, guidance_scale=7.5, eta=0.0),
            train=train,
            reward_target=None,
            accumulation_steps=accumulation,
            batch_size=2,
            streams=RandomStreams(0, 0, torch.device("cpu")),
            negative_prompt_embeds=encode_prompts(components.text_encoder, components.tokenizer, [""]),
        )
        return ctx, lora_config

    return make


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_one_step_changes_lora_only(make_ctx, components):
    ctx, _ = make_ctx()
    before = _snapshot(components.unet)
    others = {name: _snapshot(getattr(components, name)) for name in ("vae", "text_encoder")}
    metrics = training.train_step(ctx)
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    assert metrics["skipped"] == 0 and metrics["nonfinite"] == 0
    assert metrics["grad_norm"] > 0
    assert "reward/brightness" in metrics
    after = _snapshot(components.unet)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    lora = {n for n in before if "lora_" in n}
    assert changed and changed <= lora
    # Every LoRA factor moves (weight decay moves lora_A even on the first step, when lora_B is still 0).
    assert {n for n in lora if "lora_B" in n} <= changed
    for name, snap in others.items():
        for n, p in getattr(components, name).named_parameters():
            assert torch.equal(snap[n], p), f"{name}.{n} changed"
    assert all(p.dtype == torch.float32 for p in ctx.params)


def test_k_drawn_once_per_rollout(make_ctx, monkeypatch):
    ctx, _ = make_ctx(accumulation=3)
    draws, rollouts = [], []
    real_draw, real_sample = training.draw_grad_steps, training.sample_images

    def draw(*args, **kwargs):
        draws.append(real_draw(*args, **kwargs))
        return draws[-1]

    def sample(*args, **kwargs):
        rollouts.append(args[7])  # grad_steps
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(training, "draw_grad_steps", draw)
    monkeypatch.setattr(training, "sample_images", sample)
    metrics = training.train_step(ctx)
    assert len(draws) == 3 and rollouts == draws
    assert metrics["k_mean"] == pytest.approx(sum(draws) / 3)


def test_nonfinite_reward_skips_the_update(make_ctx, components):
    def nan_reward(images, prompts, metadata):
        r, info = _constant_reward(images, prompts, metadata)
        return r * float("nan"), info

    ctx, _ = make_ctx(reward_fn=nan_reward)
    before = _snapshot(components.unet)
    metrics = training.train_step(ctx)
    assert metrics["nonfinite"] == 2 and metrics["skipped"] == 1
    for n, p in components.unet.named_parameters():
        assert torch.equal(before[n], p), n
    assert all(p.grad is None for p in ctx.params)


def test_detached_reward_is_a_clear_error(make_ctx):
    def detached(images, prompts, metadata):  # what a reward computed in numpy or PIL gives back
        r, info = _constant_reward(images, prompts, metadata)
        return r.detach(), info

    ctx, _ = make_ctx(reward_fn=detached)
    with pytest.raises(RuntimeError, match="no gradient w.r.t. the images"):
        training.train_step(ctx)


def test_zero_gradient_is_reported(make_ctx):
    def flat(images, prompts, metadata):  # depends on the images, with a gradient of exactly zero
        return images.flatten(1).mean(1) * 0.0 + 1.0, {}

    ctx, _ = make_ctx(reward_fn=flat)
    metrics = training.train_step(ctx)
    assert metrics["grad_norm"] == 0.0 and metrics["skipped"] == 0
    assert "exactly zero" in training.zero_gradient_warning(metrics)
    assert training.zero_gradient_warning({**metrics, "grad_norm": 1e-9}) is None
    assert training.zero_gradient_warning({**metrics, "skipped": 1}) is None  # a skipped step is reported as such


def test_reward_target_loss():
    from alignprop.rewards import reward_loss

    r = torch.tensor([1.0, 3.0])
    assert reward_loss(r).item() == -2.0
    assert reward_loss(r, target=2.0).item() == 1.0
