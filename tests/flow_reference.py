"""Independent references for the flow-matching families' tests (SD3/3.5 and FLUX.1): the sigmas from their
formulas, a plain Euler flow loop with autograd, and a denoiser wrapper that records which calls got gradient."""

import math

import numpy as np
import torch

from alignprop.rollout import Rollout, SampleSpec
from alignprop.speed import Prepared


def make_rollout(family, components, num_steps, guidance, height, width, denoiser=None, **prepared):
    """A Rollout without the speed layer's preparation (plain modules; checkpointing as given)."""
    spec = SampleSpec(num_steps, guidance, 0.0, 0.0, height, width)
    denoiser = denoiser if denoiser is not None else components.denoiser
    return Rollout(family, components, spec, Prepared(denoiser, components.vae, **prepared), denoiser)


def x_T(rollout, batch=2, seed=0):
    return rollout.initial_latents(batch, torch.Generator().manual_seed(seed))


def sd3_sigmas(num_steps, shift=3.0):
    """SD3's sigmas from the formulas (REFERENCE_MODELS.md §5): a linspace between the statically shifted ends
    of the 1000 training sigmas (1 and shift(1/1000)), shifted once more, then a terminal 0."""
    shifted = lambda s: shift * s / (1 + (shift - 1) * s)  # noqa: E731
    return [shifted(s) for s in np.linspace(shifted(1.0), shifted(1 / 1000), num_steps)] + [0.0]


def flux_sigmas(num_steps, tokens, dynamic=True):
    """FLUX's: linspace(1, 1/T, T), for dev shifted by mu = linear in the token count (0.5 at 256, 1.15 at 4096)."""
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    if dynamic:
        mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (tokens - 256)
        sigmas = [math.exp(mu) / (math.exp(mu) + (1 / s - 1)) for s in sigmas]
    return list(sigmas) + [0.0]


def euler_images(call, latents, sigmas, vae, detach_first=0, unpack=None):
    """Plain autograd through x ← x + (σ[i+1] − σ[i])·v(x, σ[i]), then the VAE decode of z/scaling + shift.

    `call(x, sigma)` is the (guided) velocity; its outputs of the first `detach_first` steps are detached.
    """
    x = latents
    for i in range(len(sigmas) - 1):
        v = call(x, sigmas[i])
        if i < detach_first:
            v = v.detach()
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    if unpack is not None:
        x = unpack(x)
    images = vae.decode(x / vae.config.scaling_factor + vae.config.shift_factor).sample
    return (images / 2 + 0.5).clamp(0, 1)


def assert_grads_close(ours, ref, rtol=2e-4):
    assert ours.keys() == ref.keys() and len(ours) > 0
    total = sum(g.abs().sum() for g in ref.values())
    assert total > 0, "reference gradient is zero: the test would prove nothing"
    for name in ref:
        # fp32 through the transformer calls and the VAE; the reference's sigmas are float64 formulas (the
        # scheduler's are float32), so allow float32 round-off, and an absolute error of 1e-4 of the tensor's
        # largest entry for entries near zero. Measured (K = 1 and K = T, 4 steps): at most 9e-6 of a tensor's
        # largest entry for SD3.5 (3e-6 of the whole gradient's norm), 2e-6 for FLUX (6e-7).
        atol = max(1e-7, 1e-4 * ref[name].abs().max().item())
        torch.testing.assert_close(ours[name], ref[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


class CountingDenoiser(torch.nn.Module):
    """Wraps a denoiser; records for each call whether its output joined the graph and received gradient."""

    def __init__(self, denoiser):
        super().__init__()
        self.denoiser = denoiser
        self.config = denoiser.config
        self.calls = []  # per call: {"grad_enabled": bool, "got_grad": bool}

    def forward(self, *args, **kwargs):
        # Recorded before the call: checkpoint recomputation stops early, inside the denoiser.
        record = {"grad_enabled": torch.is_grad_enabled(), "got_grad": False}
        self.calls.append(record)
        out = self.denoiser(*args, **kwargs)
        if out[0].requires_grad:

            def hook(grad):
                record["got_grad"] = True

            out[0].register_hook(hook)
        return out


def check_last_k_calls(rollout, counting, cond, latents, k, checkpoint, loss_fn):
    """Exactly the last `k` of T denoiser calls get gradient; the ones before the cut build no graph."""
    num_steps = len(rollout.schedule)
    images = rollout(cond, latents, range(num_steps - k, num_steps))
    assert len(counting.calls) == num_steps
    forward_calls = list(counting.calls)
    loss_fn(images).backward()
    assert len(counting.calls) == num_steps + (k if checkpoint else 0)  # checkpointing re-runs the grad calls
    expected = [i >= num_steps - k for i in range(num_steps)]
    assert [c["got_grad"] for c in forward_calls] == expected
    assert [c["grad_enabled"] for c in forward_calls] == expected
