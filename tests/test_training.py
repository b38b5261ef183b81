"""The training step: only LoRA changes, K drawn once per rollout, non-finite losses skipped."""

import pytest
import torch

import alignprop.training as training
from alignprop import lora, speed
from alignprop.prompts import make_prompt_set
from alignprop.rng import RandomStreams
from alignprop.rollout import Rollout, SampleSpec
from alignprop.methods import Method
from alignprop.truncation import Truncation
from helpers import SD_TARGETS, config


def _constant_reward(images, prompts, metadata):
    w = torch.randn(images.shape[1:], generator=torch.Generator().manual_seed(3))
    rewards = (images * w).flatten(1).mean(1)
    return rewards, {"constant": rewards.detach()}, {"constant/brightness": images.mean(dim=(1, 2, 3))}


@pytest.fixture
def make_trainer(components, sd):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    def make(reward_fn=_constant_reward, accumulation=2, learning_rate=1e-2, truncation=None, fp8=False):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
        lora.add_lora(components.denoiser, 4, 4.0, SD_TARGETS)
        params = lora.trainable_parameters(components.denoiser)
        train = config(overrides={"train.learning_rate": learning_rate}).train
        optimizer = training.build_optimizer(params, train)
        prepared = speed.prepare(sd, components, config(overrides={"speed.fp8_prefix": fp8}).speed)
        denoiser, optimizer = accelerator.prepare(components.denoiser, optimizer)
        return training.Trainer(
            accelerator=accelerator,
            rollout=Rollout(sd, components, SampleSpec(4, 7.5), prepared, denoiser),
            reward_fn=reward_fn,
            prompt_set=make_prompt_set("simple_animals"),
            method=Method("alignprop", 4, truncation or Truncation("uniform", 4, k_min=1, k_max=4)),
            optimizer=optimizer,
            params=params,
            streams=RandomStreams(0, 0, torch.device("cpu")),
            batch_size=2,
            accumulation_steps=accumulation,
            loss_coeff=1.0,
        )

    return make


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_one_step_changes_lora_only(make_trainer, components):
    trainer = make_trainer()
    before = _snapshot(components.denoiser)
    others = {name: _snapshot(module) for name, module in (("vae", components.vae),
                                                           ("text_encoder", components.text_encoders[0]))}
    metrics, samples = training.train_step(trainer)
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    assert metrics["skipped"] == 0 and metrics["nonfinite"] == 0
    assert metrics["grad_norm"] > 0
    assert "reward/constant" in metrics and "reward/constant/brightness" in metrics
    assert len(samples.prompts) == 4 and samples.images is None  # images only on the steps that keep them
    after = _snapshot(components.denoiser)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    lora = {n for n in before if "lora_" in n}
    assert changed and changed <= lora
    # Every LoRA factor moves (weight decay moves lora_A even on the first step, when lora_B is still 0).
    assert {n for n in lora if "lora_B" in n} <= changed
    for (name, snap), module in zip(others.items(), (components.vae, components.text_encoders[0])):
        for n, p in module.named_parameters():
            assert torch.equal(snap[n], p), f"{name}.{n} changed"
    assert all(p.dtype == torch.float32 for p in trainer.params)


def test_kept_samples_are_the_last_micro_batch(make_trainer):
    metrics, samples = training.train_step(make_trainer(), keep_samples=True)
    assert samples.images.shape == (2, 3, 32, 32) and samples.images.device.type == "cpu"
    assert samples.image_prompts == samples.prompts[-2:] and samples.rewards.shape == (2,)


def test_k_drawn_once_per_rollout(make_trainer, monkeypatch):
    """One draw per rollout, and each rollout's grad steps are exactly the last K."""
    from alignprop import sampling

    draws, rollouts = [], []

    class Recording(Truncation):
        def draw(self, generator):
            draws.append(super().draw(generator))
            return draws[-1]

    trainer = make_trainer(accumulation=3, truncation=Recording("uniform", 4, k_min=1, k_max=4))
    real_sample = sampling.sample

    def sample(schedule, latents, nograd_denoise, grad_denoise, grad_steps=(), **kwargs):
        rollouts.append(list(grad_steps))
        return real_sample(schedule, latents, nograd_denoise, grad_denoise, grad_steps, **kwargs)

    monkeypatch.setattr(sampling, "sample", sample)
    metrics, _ = training.train_step(trainer)
    assert len(draws) == 3 and rollouts == [list(range(4 - k, 4)) for k in draws]
    assert metrics["k_mean"] == pytest.approx(sum(draws) / 3)


def test_nonfinite_reward_skips_the_update(make_trainer, components):
    def nan_reward(images, prompts, metadata):
        r, terms, info = _constant_reward(images, prompts, metadata)
        return r * float("nan"), terms, info

    trainer = make_trainer(reward_fn=nan_reward)
    before = _snapshot(components.denoiser)
    metrics, _ = training.train_step(trainer)
    assert metrics["nonfinite"] == 2 and metrics["skipped"] == 1
    for n, p in components.denoiser.named_parameters():
        assert torch.equal(before[n], p), n
    assert all(p.grad is None for p in trainer.params)


def test_detached_reward_is_a_clear_error(make_trainer):
    def detached(images, prompts, metadata):  # what a reward computed in numpy or PIL gives back
        r, terms, info = _constant_reward(images, prompts, metadata)
        return r.detach(), terms, info

    with pytest.raises(RuntimeError, match="no gradient w.r.t. the images"):
        training.train_step(make_trainer(reward_fn=detached))


def test_zero_gradient_is_reported(make_trainer):
    def flat(images, prompts, metadata):  # depends on the images, with a gradient of exactly zero
        return images.flatten(1).mean(1) * 0.0 + 1.0, {}, {}

    metrics, _ = training.train_step(make_trainer(reward_fn=flat))
    assert metrics["grad_norm"] == 0.0 and metrics["skipped"] == 0
    assert "exactly zero" in training.zero_gradient_warning(metrics)
    assert training.zero_gradient_warning({**metrics, "grad_norm": 1e-9}) is None
    assert training.zero_gradient_warning({**metrics, "skipped": 1}) is None  # a skipped step is reported as such


def test_reward_target_loss():
    from alignprop.rewards import reward_loss

    r = torch.tensor([1.0, 3.0])
    assert reward_loss(r).item() == -2.0
    assert reward_loss(r, target=2.0).item() == 1.0


def test_zero_gradient_fraction_counts_the_exact_zeros_of_one_rollouts_lora_b_gradient(make_trainer):
    from alignprop import profiling
    from alignprop.training import micro_batch

    trainer = make_trainer(accumulation=1)
    found = profiling.zero_gradient_fraction(trainer, 2, scales=(1.0, 0.0, float("inf")))
    assert all(p.grad is None for p in trainer.params)  # leaves no gradient behind
    # Independently: the same rollout (K=2, seed 1234), its loss backpropagated, B's zeros counted.
    trainer.streams = RandomStreams(1234, 0, torch.device("cpu"))
    trainer.method = Method("alignprop", 4, Truncation("fixed", 4, 2))
    micro_batch(trainer).loss.backward()
    b = torch.cat([p.grad.flatten() for n, p in trainer.rollout.components.denoiser.named_parameters()
                   if "lora_B" in n])
    assert b.numel() > 0 and b.abs().sum() > 0
    assert found[1.0] == {"zero_fraction": (b == 0).float().mean().item(), "finite": True}
    assert found[0.0] == {"zero_fraction": 1.0, "finite": True}  # a zero scale: every entry underflows
    assert found[float("inf")]["finite"] is False  # an overflowing scale is reported, not hidden


def test_fp8_drift_sets_the_float8_prefix_beside_the_exact_rollout(make_trainer):
    import dataclasses

    from alignprop import profiling
    from alignprop.training import micro_batch

    trainer = make_trainer(accumulation=1, fp8=True)
    fp8 = trainer.rollout.prepared
    trainer.rollout.prepared = dataclasses.replace(fp8, fp8_layers=())  # as without config.speed.fp8_prefix
    with pytest.raises(ValueError, match="pass --config.speed.fp8_prefix=True"):
        profiling.fp8_drift(trainer, 1)
    trainer.rollout.prepared = fp8
    drift = profiling.fp8_drift(trainer, 1)
    assert all(p.grad is None for p in trainer.params) and trainer.rollout.prepared is fp8  # leaves them as found
    # Independently: the same rollout (K=1, seed 1234) through the float8 prefix, and with no layer switched to it

    def images(prepared):
        trainer.rollout.prepared = prepared
        trainer.streams = RandomStreams(1234, 0, torch.device("cpu"))
        trainer.method = Method("alignprop", 4, Truncation("fixed", 4, 1))
        return micro_batch(trainer).images.detach()

    difference = (images(fp8) - images(dataclasses.replace(fp8, fp8_layers=()))).abs()
    assert drift["fp8_vs_exact"]["images_max_abs_diff"] == difference.max().item() > 0
    assert drift["fp8_vs_exact"]["images_mean_abs_diff"] == pytest.approx(difference.mean().item(), rel=1e-6)
    assert drift["exact_other_kernels_vs_exact"]["images_max_abs_diff"] == 0.0  # on the CPU: no cuDNN to switch
    assert drift["bfloat16_vs_exact"]["images_max_abs_diff"] > 0  # this run is fp32: the other is bf16 autocast


def test_fp16_grad_scaler_starts_at_the_configured_scale():
    from alignprop import config as configs

    cfg = config(overrides={"mixed_precision": "fp16", "train.grad_scale_init": 2.0**20})
    ddp, scaler = training.accelerator_handlers(cfg)
    assert scaler.to_kwargs() == {"init_scale": 2.0**20}  # what accelerate passes to torch's GradScaler
    assert ddp.to_kwargs() == {"broadcast_buffers": False}  # (tests/dist_worker.py checks the wrapped module)
    assert [h.to_kwargs() for h in training.accelerator_handlers(config(overrides={"mixed_precision": "bf16"}))] == [
        {"broadcast_buffers": False}]
    assert "config.train.grad_scale_init=0.0: must be > 0" in configs.problems(
        config(overrides={"train.grad_scale_init": 0.0}))


def test_compare_with_eager_is_zero_for_an_eager_trainer(make_trainer):
    """The benchmark's compiled-vs-eager check run where nothing is compiled: the same fixed rollout three times,
    so every difference is exactly zero (what makes its GPU figures a measure of compilation alone)."""
    from alignprop import profiling

    found = profiling.compare_with_eager(make_trainer(accumulation=1), 2)
    assert found["k"] == 2 and found["reward_scale"] > 0
    for row in (found["compiled_vs_eager"], found["eager_vs_eager_other_kernels"]):
        assert row["images_max_abs_diff"] == row["rewards_max_abs_diff"] == row["grad_rel_diff"] == 0.0
        assert row["grad_cosine"] == pytest.approx(1.0, abs=1e-6)
