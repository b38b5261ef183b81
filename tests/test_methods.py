"""Each method of the family against an independently written reference loop with its stop-gradients
(REFERENCE_METHODS.md §12): which denoiser calls keep gradients and through which inputs, what the reward sees."""

import math

import pytest
import torch

from alignprop import methods
from alignprop.methods import Method, Plan
from alignprop.rollout import Rollout, SampleSpec
from alignprop.speed import Prepared
from alignprop.truncation import Truncation
from helpers import config, fixed_reward, lora_grads

T = 6
GUIDANCE = 7.5
PROMPTS = ["a photo of a cat", "an owl on a branch"]


def make_rollout(components, sd, denoiser=None):
    denoiser = denoiser if denoiser is not None else components.denoiser
    return Rollout(sd, components, SampleSpec(T, GUIDANCE), Prepared(denoiser, components.vae), denoiser)


def inputs(rollout, seed=0):
    cond = rollout.encode(PROMPTS)
    return cond, rollout.initial_latents(len(PROMPTS), torch.Generator().manual_seed(seed))


def ours(components, sd, plan, seed=0, noise_seed=5, penalty=None):
    rollout = make_rollout(components, sd)
    cond, latents = inputs(rollout, seed)
    images = methods.images(rollout, cond, latents, plan, torch.Generator().manual_seed(noise_seed), penalty)
    return images, rollout, cond, latents


# ---- the reference: DDIM eta=0 with CFG written from the equations, every stop-gradient explicit ----


def alphas_and_timesteps(components):
    alphas = components.scheduler.alphas_cumprod.tolist()
    step = 1000 // T
    return alphas, step, [step * i + 1 for i in reversed(range(T))]


def guided(unet, x, t, cond, negative):
    out = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([negative, cond])).sample
    uncond, text = out.chunk(2)
    return uncond + GUIDANCE * (text - uncond)


def reference_latents(components, cond, negative, x, grad_steps, detach_input=False, stop=None, start=0):
    """Steps start.. with gradients through the outputs of `grad_steps` only (their inputs detached with
    `detach_input`); at `stop`, the predicted clean sample."""
    unet = components.denoiser
    alphas, step, timesteps = alphas_and_timesteps(components)
    for i in range(start, T):
        t = timesteps[i]
        if i in grad_steps:
            eps = guided(unet, x.detach() if detach_input else x, t, cond, negative)
        else:
            with torch.no_grad():
                eps = guided(unet, x, t, cond, negative)
        a_t = alphas[t]
        a_prev = alphas[t - step] if t - step >= 0 else alphas[0]
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        if i == stop:
            return x0
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return x


def decode(components, x):
    vae = components.vae
    return (vae.decode(x / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)


def conds(rollout, cond):
    c = cond["encoder_hidden_states"]
    return c, rollout.negative["encoder_hidden_states"].expand_as(c)


def assert_grads_close(a, b):
    assert a.keys() == b.keys() and sum(g.abs().sum() for g in b.values()) > 0
    for name in a:
        atol = max(1e-6, 1e-4 * b[name].abs().max().item())  # float32 round-off of a reordered sum (test_speed)
        torch.testing.assert_close(a[name], b[name], rtol=2e-4, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("plan", [Plan((5,)), Plan((3, 4, 5)), Plan((4,), stop=4),
                                  Plan((1, 3), stop=3, detach_input=True),
                                  Plan((0, 2, 4), stop=4, detach_input=True)])
def test_gradient_equals_the_reference(lora_components, sd, plan):
    images, rollout, cond, latents = ours(lora_components, sd, plan)
    got = lora_grads(lora_components.denoiser, fixed_reward(images).sum())
    c, n = conds(rollout, cond)
    x = reference_latents(lora_components, c, n, latents, set(plan.grad_steps), plan.detach_input, plan.stop)
    expected = lora_grads(lora_components.denoiser, fixed_reward(decode(lora_components, x)).sum())
    assert_grads_close(got, expected)


def test_drtune_without_the_input_detach_is_another_estimator(lora_components, sd):
    """With a denoiser that depends on its input, the input path contributes: dropping the detach changes the
    gradient (a missing detach would be caught by the test above)."""
    plan = Plan((1, 3), stop=3, detach_input=True)
    with_detach = lora_grads(lora_components.denoiser, fixed_reward(ours(lora_components, sd, plan)[0]).sum())
    plain = Plan((1, 3), stop=3)
    without = lora_grads(lora_components.denoiser, fixed_reward(ours(lora_components, sd, plain)[0]).sum())
    diff = sum((with_detach[k] - without[k]).abs().sum() for k in with_detach)
    assert diff > 1e-3 * sum(g.abs().sum() for g in without.values())


class Spy(torch.nn.Module):
    """Records, per denoiser call: grad mode, whether its input requires grad, and whether its output got grad."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.config, self.calls = unet, unet.config, []

    def forward(self, x, *args, **kwargs):
        record = {"grad": torch.is_grad_enabled(), "input_requires_grad": x.requires_grad, "got_grad": False,
                  "batch": len(x)}
        self.calls.append(record)
        out = self.unet(x, *args, **kwargs)
        if out[0].requires_grad:
            out[0].register_hook(lambda g: record.update(got_grad=True))
        return out


@pytest.mark.parametrize("plan,calls,grads", [
    (Plan((4,), stop=4), 5, [False] * 4 + [True]),  # ReFL: no call after s
    (Plan((0, 2, 4), stop=4, detach_input=True), 5, [True, False, True, False, True]),  # DRTune
    (Plan((), copies=2), T + 1, [False] * T + [True]),  # DRaFT-LV: T no-grad calls, one batched grad call
])
def test_which_calls_get_gradient_and_through_which_inputs(lora_components, sd, plan, calls, grads):
    spy = Spy(lora_components.denoiser)
    rollout = make_rollout(lora_components, sd, denoiser=spy)
    cond, latents = inputs(rollout)
    images = methods.images(rollout, cond, latents, plan, torch.Generator().manual_seed(5))
    forward = list(spy.calls)  # the checkpointed grad calls run again in backward
    fixed_reward(images).sum().backward()
    assert len(forward) == calls
    assert [c["got_grad"] for c in forward] == grads and [c["grad"] for c in forward] == grads
    if plan.detach_input:
        assert not any(c["input_requires_grad"] for c in forward)  # the gradient stops at every input
    if plan.copies:
        assert forward[-1]["batch"] == 2 * plan.copies * len(PROMPTS) and images.shape[0] == plan.copies * 2


def test_draft_lv_is_the_mean_of_its_copies_and_the_reference(lora_components, sd):
    """n = 2 copies from fresh noise = the mean of the two single-copy gradients with the same noise, and the
    reference: x without gradients, re-noised to the last step's level, one DDIM step with gradients."""
    images, rollout, cond, latents = ours(lora_components, sd, Plan((), copies=2), noise_seed=5)
    loss = fixed_reward(images).mean()
    got = lora_grads(lora_components.denoiser, loss)
    c, n = conds(rollout, cond)
    with torch.no_grad():
        x = reference_latents(lora_components, c, n, latents, set())
    g = torch.Generator().manual_seed(5)
    noises = [torch.randn(x.shape, generator=g) for _ in range(2)]  # the order the method draws them
    alphas, _, timesteps = alphas_and_timesteps(lora_components)
    a = alphas[timesteps[-1]]
    singles, values = [], []
    for noise in noises:
        z = math.sqrt(a) * x + math.sqrt(1 - a) * noise
        one = reference_latents(lora_components, c, n, z, {T - 1}, start=T - 1)
        value = fixed_reward(decode(lora_components, one)).mean()
        values.append(value.detach())
        singles.append(lora_grads(lora_components.denoiser, value))
    torch.testing.assert_close(loss.detach(), torch.stack(values).mean(), rtol=1e-5, atol=1e-6)
    assert_grads_close(got, {k: (singles[0][k] + singles[1][k]) / 2 for k in got})
    assert (noises[0] - noises[1]).abs().max() > 0.1  # distinct noise for each copy


def test_pred_x0_is_the_schedules_clean_sample_prediction(components, sd):
    rollout = make_rollout(components, sd)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    out = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    alphas, _, timesteps = alphas_and_timesteps(components)
    for i in (0, 3, T - 1):
        a = alphas[timesteps[i]]
        torch.testing.assert_close(rollout.schedule.pred_x0(i, out, x), (x - math.sqrt(1 - a) * out) / math.sqrt(a))
        torch.testing.assert_close(rollout.schedule.renoise(i, x, out), math.sqrt(a) * x + math.sqrt(1 - a) * out)


def test_the_penalty_is_zero_at_init_and_its_gradient_matches_autograd(lora_components, sd):
    """DRaFT+: mean over grad steps of the mean squared distance to the base model on the same inputs; the base
    model here is peft's own adapter switch (independent of alignprop's)."""
    unet = lora_components.denoiser
    plan = Plan((3, 4, 5))
    penalty = []
    ours(lora_components, sd, plan, penalty=penalty)
    kl = torch.cat(penalty).mean()
    got = lora_grads(unet, kl)
    rollout = make_rollout(lora_components, sd)
    cond, latents = inputs(rollout)
    c, n = conds(rollout, cond)
    alphas, step, timesteps = alphas_and_timesteps(lora_components)
    x, terms = latents, []
    for i, t in enumerate(timesteps):
        with torch.set_grad_enabled(i in plan.grad_steps):
            eps = guided(unet, x, t, c, n)
        if i in plan.grad_steps:
            unet.disable_adapters()
            with torch.no_grad():
                base = guided(unet, x, t, c, n)
            unet.enable_adapters()
            terms.append((eps - base).pow(2).flatten(1).mean(1))
        a_t, a_prev = alphas[t], (alphas[t - step] if t - step >= 0 else alphas[0])
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    expected = torch.cat(terms).mean()
    torch.testing.assert_close(kl.detach(), expected.detach(), rtol=1e-4, atol=1e-10)
    assert_grads_close(got, lora_grads(unet, expected))
    # At initialization (lora_B = 0) the fine-tuned model is the base model: no penalty, no gradient from it.
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.zero_()
    penalty = []
    ours(lora_components, sd, plan, penalty=penalty)
    assert torch.cat(penalty).abs().max() == 0


def test_plans_are_drawn_once_per_rollout_as_each_method_says():
    g = torch.Generator().manual_seed(0)
    fixed = Truncation("fixed", 50, 3)
    assert Method("draft_k", 50, fixed).draw(g) == Plan((47, 48, 49))
    assert Method("draft_lv", 50, fixed, lv_copies=3).draw(g) == Plan((), copies=3)
    refl = [Method("refl", 50, fixed, stop_last=10).draw(g) for _ in range(400)]
    assert {p.stop for p in refl} == set(range(40, 50)) and all(p.grad_steps == (p.stop,) for p in refl)
    for p in (Method("drtune", 50, fixed, stop_last=20, drtune_k=3).draw(g) for _ in range(400)):
        stride = (p.stop + 1) // 3
        assert 30 <= p.stop <= 49 and p.detach_input and len(p.grad_steps) == 3 and p.k == 3
        assert all(b - a == stride for a, b in zip(p.grad_steps, p.grad_steps[1:])) and p.grad_steps[-1] <= p.stop
    uniform = Method("alignprop", 50, Truncation("uniform", 50, k_min=1, k_max=50))
    ks = {uniform.draw(g).k for _ in range(500)}
    assert min(ks) == 1 and max(ks) == 50


@pytest.mark.parametrize("overrides,needle", [
    ({"train.method": "ppo"}, "config.train.method='ppo': must be one of alignprop, draft_k, draft_lv, refl, drtune"),
    ({"train.method": "draft_k"}, "DRaFT-K is fixed truncation"),
    ({"train.method": "draft_lv", "train.lv_copies": 0}, "config.train.lv_copies=0: must be an int >= 1"),
    ({"train.method": "refl", "train.stop_last": 9}, "config.train.stop_last=9: must be in [1, sample.num_steps=8]"),
    ({"train.method": "drtune", "train.drtune_k": 0}, "config.train.drtune_k=0: must be >= 1"),
    ({"train.kl_coeff": -1.0}, "config.train.kl_coeff=-1.0: must be >= 0"),
    ({"eval_rewards": "aesthetic,nope"}, "config.eval_rewards='aesthetic,nope': 'nope' is not a reward"),
])
def test_bad_method_settings_name_their_key(overrides, needle):
    from alignprop import config as configs

    found = "\n".join(configs.problems(config(overrides=overrides)))
    assert needle in found, found


@pytest.mark.parametrize("family,variant", [("flux", "dev"), ("sd3", "sd35"), ("sdxl", "sdxl")])
@pytest.mark.parametrize("plan", [Plan((3,), stop=3), Plan((0, 2), stop=3, detach_input=True), Plan((), copies=2),
                                  Plan((4, 5))], ids=["refl", "drtune", "draft_lv", "alignprop"])
def test_every_method_runs_on_the_other_families(family, variant, plan):
    """The same plans through FLUX's packed latents (its position ids are not batched), SD3's CFG and SDXL's
    nested added conditioning (repeated for DRaFT-LV's copies)."""
    from alignprop import families
    from alignprop.lora import add_lora
    from helpers import randomize_lora, tiny_components

    fam = families.get(family)
    components = tiny_components(fam, variant)
    add_lora(components.denoiser, 4, 4.0, fam.lora_targets)
    randomize_lora(components.denoiser)
    rollout = Rollout(fam, components, SampleSpec(T, 3.5), Prepared(components.denoiser, components.vae),
                      components.denoiser)
    cond, latents = inputs(rollout)
    penalty = []
    images = methods.images(rollout, cond, latents, plan, torch.Generator().manual_seed(5), penalty)
    assert images.shape[0] == (plan.copies or 1) * len(PROMPTS) and torch.isfinite(images).all()
    grads = lora_grads(components.denoiser, fixed_reward(images).sum() + torch.cat(penalty).mean())
    assert sum(g.abs().sum() for g in grads.values()) > 0
    assert len(penalty) == (1 if plan.copies else len(plan.grad_steps))


def test_flow_clean_sample_prediction_and_renoise():
    from alignprop.sampling import FlowMatchSchedule

    schedule = FlowMatchSchedule({"num_train_timesteps": 1000, "shift": 3.0}, 4)
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    for i in range(4):
        sigma = float(schedule.sigmas[i])
        torch.testing.assert_close(schedule.pred_x0(i, v, x), x - sigma * v)
        torch.testing.assert_close(schedule.renoise(i, x, v), (1 - sigma) * x + sigma * v)
    # One Euler step to sigma = 0 from the last step lands on the predicted clean sample.
    torch.testing.assert_close(schedule.step(3, v, x), schedule.pred_x0(3, v, x))


def test_max_grad_calls():
    assert Method("alignprop", 50, Truncation("fixed", 50, 1)).max_grad_calls == 1
    assert Method("alignprop", 50, Truncation("uniform", 50, k_min=1, k_max=30)).max_grad_calls == 30
    assert Method("draft_k", 50, Truncation("fixed", 50, 5)).max_grad_calls == 5
    assert Method("refl", 50, Truncation("fixed", 50, 1)).max_grad_calls == 1
    assert Method("draft_lv", 50, Truncation("fixed", 50, 1), lv_copies=2).max_grad_calls == 1
    assert Method("alignprop", 50, Truncation("uniform", 50, k_min=1)).max_grad_calls == 50  # k_max: the steps
    assert Method("drtune", 50, Truncation("fixed", 50, 1), drtune_k=3).max_grad_calls == 3
