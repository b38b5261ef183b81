"""Random streams: seeded per (seed, process, purpose); evaluation leaves training and global RNG alone."""

import torch

from alignprop.evaluation import evaluate
from alignprop.rng import RandomStreams, derive_seed
from alignprop.rollout import Rollout, SampleSpec
from alignprop.speed import Prepared


def rollout_of(components, sd, eta):
    return Rollout(sd, components, SampleSpec(2, 7.5, eta=eta), Prepared(components.denoiser, components.vae))


def brightness(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3))[:, None]


def test_derived_seeds_are_distinct_and_stable():
    seeds = {derive_seed(42, p, s) for p in range(8) for s in range(3)}
    assert len(seeds) == 24
    assert derive_seed(42, 1, 0) == derive_seed(42, 1, 0)


def test_stream_state_round_trip():
    a = RandomStreams(0, 0, torch.device("cpu"))
    state = a.state_dict()
    first = (torch.randn(3, generator=a.noise), a.prompts.random(), torch.rand(1, generator=a.truncation))
    a.load_state_dict(state)
    again = (torch.randn(3, generator=a.noise), a.prompts.random(), torch.rand(1, generator=a.truncation))
    assert torch.equal(first[0], again[0]) and first[1] == again[1] and torch.equal(first[2], again[2])


def test_evaluation_is_reproducible_and_touches_no_other_rng(components, sd):
    streams = RandomStreams(0, 0, torch.device("cpu"))
    before_streams = streams.state_dict()
    before_global = torch.get_rng_state()
    items = [("cat", {}), ("dog", {}), ("owl", {})]
    rollout = rollout_of(components, sd, eta=0.5)
    run = lambda: evaluate(rollout, brightness, items, 0, 2)  # noqa: E731
    images, prompts, rewards = run()
    images2, _, rewards2 = run()
    assert prompts == ["cat", "dog", "owl"] and images.shape[0] == 3
    assert torch.equal(images, images2) and torch.equal(rewards, rewards2)
    assert torch.equal(torch.get_rng_state(), before_global)
    after = streams.state_dict()
    assert torch.equal(after["noise"], before_streams["noise"]) and after["prompts"] == before_streams["prompts"]


def test_short_last_evaluation_batch_is_padded_to_the_full_size(components, sd):
    """3 items in batches of 2: the denoiser always sees one batch size (one compiled graph), and the
    padding changes nothing: each item gets the image of a batch-1 evaluation (same noise rows)."""
    sizes = []
    hook = components.denoiser.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    items = [("cat", {}), ("dog", {}), ("owl", {})]
    rollout = rollout_of(components, sd, eta=0.0)
    try:
        run = lambda batch, items=items: evaluate(rollout, brightness, items, 0, batch)  # noqa: E731
        images, prompts, rewards = run(2)
        assert set(sizes) == {4}  # 2 prompts x (conditional, unconditional), the last batch too
        single, _, single_rewards = run(1)
    finally:
        hook.remove()
    assert prompts == ["cat", "dog", "owl"] and images.shape[0] == rewards.shape[0] == 3
    torch.testing.assert_close(images, single, atol=1e-5, rtol=0)
    torch.testing.assert_close(rewards, single_rewards, atol=1e-6, rtol=0)
    # Each item its own noise: a prompt twice gives two different images.
    twice, _, _ = run(2, [("cat", {})] * 2)
    assert (twice[0] - twice[1]).abs().max() > 1e-3


def test_builders_leave_the_global_rng_alone(sd):
    """Tiny models, reward towers and the LoRA draw from their own seeds: the caller's RNG state is untouched."""
    import ml_collections

    from alignprop.families import Source
    from alignprop.lora import add_lora
    from alignprop.rewards import aesthetic, towers
    from alignprop.rng import seeded

    state = torch.random.get_rng_state()
    unet = sd.load(Source("tiny", "sd1")).denoiser
    aesthetic.build_scorer(ml_collections.ConfigDict({"clip_model": "tiny", "mlp_path": None}), seed=0)
    towers.tiny_open_clip(seed=0)
    with seeded(5):
        add_lora(unet, 4, 4.0, sd.lora_targets)
    assert torch.equal(state, torch.random.get_rng_state())
    other = sd.load(Source("tiny", "sd1")).denoiser
    with seeded(5):
        add_lora(other, 4, 4.0, sd.lora_targets)
    lora = {n: p for n, p in unet.named_parameters() if "lora_A" in n}
    assert lora and all(torch.equal(p, other.get_parameter(n)) for n, p in lora.items())
