"""The speed layer computes the same numbers: merged LoRA, the checkpoint plan, chunked decoding, torch.compile."""

import dataclasses
import sys
import threading
import time
import types

import pytest
import torch

from alignprop import kernels, speed
from alignprop.rollout import Rollout, SampleSpec, grad_suffix
from alignprop.speed import Prepared
from helpers import config, fixed_reward, lora_grads

STEPS = 4
PROMPTS = ["a photo of a cat", "an owl"]


def run(components, sd, k, prepared, size=None):
    """Images and LoRA gradients of one rollout with fixed K through `prepared` (`size`: square, in pixels)."""
    rollout = Rollout(sd, components, SampleSpec(STEPS, 7.5, height=size, width=size), prepared, prepared.denoiser)
    latents = rollout.initial_latents(2, torch.Generator().manual_seed(0))
    images = rollout(rollout.encode(PROMPTS), latents, grad_suffix(STEPS, k))
    return images.detach(), lora_grads(components.denoiser, fixed_reward(images).sum())


def compiling(overrides=None):
    """The speed settings of the real experiments (compile on; the tiny config turns it off)."""
    return config(overrides={"speed.compile": True, **(overrides or {})}).speed


def counting_backend(graphs, forwards=None):
    """aot_eager that appends each graph it compiles to `graphs` (and each run of one to `forwards`)."""
    from torch._dynamo.backends.debugging import aot_eager

    def backend(gm, example_inputs):
        graphs.append(gm)
        compiled = aot_eager(gm, example_inputs)
        if forwards is None:
            return compiled

        def forward(*args):
            forwards.append(gm)
            return compiled(*args)

        return forward

    return backend


def plain(components, **options):
    return Prepared(components.denoiser, components.vae, **options)


def assert_same(a, b, rtol=1e-4):
    """Same images and gradients up to float32 round-off: the merged weight W + s·B·A and peft's x·Aᵀ·Bᵀ,
    recomputation and compiled graphs sum in other orders, so each gradient entry may differ by 1e-4 of its
    tensor's largest entry (entries near zero have no meaningful relative error)."""
    (images_a, grads_a), (images_b, grads_b) = a, b
    torch.testing.assert_close(images_a, images_b, rtol=rtol, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    assert sum(g.abs().sum() for g in grads_a.values()) > 0
    for name in grads_a:
        atol = max(1e-6, 1e-4 * grads_b[name].abs().max().item())
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("k", [1, STEPS])
def test_merged_lora_equals_peft_forward(lora_components, sd, k):
    reference = run(lora_components, sd, k, plain(lora_components, checkpoint_grad_steps=False))
    assert kernels.merge_lora_forward(lora_components.denoiser) > 0
    assert_same(run(lora_components, sd, k, plain(lora_components, checkpoint_grad_steps=False)), reference)
    assert_same(run(lora_components, sd, k, plain(lora_components, checkpoint_grad_steps=True)), reference)


def test_merged_lora_keeps_peft_state_and_unmerges_exactly(lora_components):
    from peft.utils import get_peft_model_state_dict

    unet = lora_components.denoiser
    before = {n: p.clone() for n, p in unet.state_dict().items()}
    keys = set(get_peft_model_state_dict(unet))
    kernels.merge_lora_forward(unet)
    assert set(get_peft_model_state_dict(unet)) == keys  # saving is unaffected
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    kernels.unmerge_lora_forward(unet)
    after = unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)


def test_merge_skips_models_without_the_training_adapter(components):
    """The soup's named adapters (lora_a, lora_b) keep peft's forward, which mixes them by weight."""
    from alignprop.lora import add_lora
    from peft import LoraConfig

    components.denoiser.add_adapter(LoraConfig(r=2, target_modules=["to_q"]), adapter_name="lora_a")
    assert kernels.merge_lora_forward(components.denoiser) == 0
    add_lora(components.denoiser, 2, 2.0, ["to_k"])
    assert kernels.merge_lora_forward(components.denoiser) > 0


@pytest.mark.parametrize("merged", [False, True])
def test_block_checkpointing_alone_and_nested(lora_components, sd, merged):
    reference = run(lora_components, sd, 2, plain(lora_components, checkpoint_grad_steps=False))
    if merged:
        kernels.merge_lora_forward(lora_components.denoiser)
    lora_components.denoiser.enable_gradient_checkpointing()
    assert_same(run(lora_components, sd, 2, plain(lora_components, checkpoint_grad_steps=False)), reference)
    # nested in the whole-call checkpoint
    assert_same(run(lora_components, sd, 2, plain(lora_components, checkpoint_grad_steps=True)), reference)


def test_the_default_plan_gives_the_reference_gradient(lora_components, sd):
    """`speed.prepare` with the config's defaults (merged LoRA, block and call checkpointing but the last
    step, the decoder per image and checkpointed; compile skipped on the CPU) against plain autograd."""
    reference = run(lora_components, sd, 3, plain(lora_components, checkpoint_grad_steps=False))
    prepared = speed.prepare(sd, lora_components, config().speed)
    assert (prepared.compiled, prepared.uncheckpointed_steps, prepared.decode_chunk) == (False, 1, 1)
    assert prepared.checkpoint_decode and lora_components.denoiser.is_gradient_checkpointing
    assert_same(run(lora_components, sd, 3, prepared), reference)


@pytest.mark.parametrize("chunk,checkpoint", [(1, False), (1, True), (2, True)])
def test_chunked_checkpointed_decode(components, chunk, checkpoint):
    latents = torch.randn(3, 4, 16, 16, requires_grad=True)
    whole = plain(components).decode(latents) / 2 + 0.5  # compared in [0, 1], as the rollout returns them
    (grad_whole,) = torch.autograd.grad(fixed_reward(whole).sum(), latents)
    ours = plain(components, decode_chunk=chunk, checkpoint_decode=checkpoint).decode(latents) / 2 + 0.5
    (grad_ours,) = torch.autograd.grad(fixed_reward(ours).sum(), latents)
    # Batch 1 vs 3 convolutions sum in other orders: measured up to 1.5e-6 (images up to 1.35, about 10 float32
    # ulps; was just under the former atol of 1e-6 on other machines, over it on this one's CPU kernels).
    torch.testing.assert_close(ours, whole, rtol=1e-5, atol=4e-6)
    # Convolutions at batch 1 vs 3 pick different kernels/summation orders: float32 round-off, relative
    # to the gradient's scale (max |grad| ~ 1e-2 here), not to each element.
    torch.testing.assert_close(grad_ours, grad_whole, rtol=1e-4, atol=1e-5 * grad_whole.abs().max().item())


def test_checkpointed_reward_gives_the_same_gradient():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)

    def reward_fn(images, prompts, metadata):
        return (images.sin() ** 2).flatten(1).sum(1), {"n": torch.ones(2)}, {}

    cfg = config().speed
    cfg.checkpoint_reward = True
    rewards, components, _ = speed.reward_call(reward_fn, cfg)(x, ["a", "b"], [{}, {}])
    (g,) = torch.autograd.grad(rewards.sum(), x)
    (g_ref,) = torch.autograd.grad(reward_fn(x, None, None)[0].sum(), x)
    torch.testing.assert_close(g, g_ref)
    assert torch.equal(components["n"], torch.ones(2))


@pytest.mark.parametrize("backend,compiled", [("inductor", False), ("aot_eager", True)])
def test_compile_switch(components, sd, backend, compiled):
    """Inductor is skipped on the CPU; otherwise the denoiser (every call) and the VAE decoder are compiled in place."""
    import torch._dynamo

    try:
        prepared = speed.prepare(sd, components, compiling(), backend=backend)
        assert prepared.compiled == compiled
        assert (components.denoiser._compiled_call_impl is not None) == compiled
        assert (components.vae.decoder._compiled_call_impl is not None) == compiled
    finally:
        torch._dynamo.reset()


def test_compile_scope_blocks_compiles_the_repeated_blocks_only(components, sd):
    import torch._dynamo

    try:
        speed.prepare(sd, components, compiling({"speed.compile_scope": "blocks"}), backend="aot_eager")
        for module, names in ((components.denoiser, sd.compile_blocks),
                              (components.vae.decoder, sd.vae_compile_blocks)):
            assert module._compiled_call_impl is None
            blocks = [m for m in module.modules() if type(m).__name__ in names]
            assert blocks and all(m._compiled_call_impl is not None for m in blocks)
            assert {type(m).__name__ for m in blocks} == set(names)
            others = [m for m in module.modules() if type(m).__name__ not in names]
            assert all(m._compiled_call_impl is None for m in others)
        assert torch._dynamo.config.recompile_limit >= speed.BLOCK_RECOMPILE_LIMIT
    finally:
        torch._dynamo.reset()


def test_every_family_names_blocks_its_models_have():
    """The block names of each family's regional compilation are classes its denoiser and VAE decoder contain."""
    from alignprop import families
    from helpers import tiny_components

    for name in ("sd", "sdxl", "sd3", "flux"):
        family = families.get(name)
        components = tiny_components(family)
        for module, names in ((components.denoiser, family.compile_blocks),
                              (components.vae.decoder, family.vae_compile_blocks)):
            present = {type(m).__name__ for m in module.modules()}
            assert set(names) <= present, (name, set(names) - present)
    with pytest.raises(ValueError, match=r"compile_scope='blocks': Decoder has no NoSuchBlock; use compile_scope"):
        speed.compile_blocks(components.vae.decoder, ("NoSuchBlock",), {"backend": "aot_eager"})


def test_compiled_shapes_are_static(components, sd):
    """A second batch size (evaluation's) gets its own static graph: torch.compile's default would
    recompile the first one shape-generic (symbolic sizes), slower for the training batch too."""
    import torch._dynamo

    graphs = []

    def recording_backend(gm, example_inputs):
        symbolic = any(isinstance(x, torch.SymInt) or (isinstance(x, torch.Tensor) and any(
            isinstance(s, torch.SymInt) for s in x.shape)) for x in example_inputs)
        graphs.append(symbolic)
        return gm.forward

    try:
        speed.prepare(sd, components, compiling(), backend=recording_backend)
        channels = components.vae.config.latent_channels
        with torch.no_grad():
            for batch in (1, 2, 1):
                components.vae.decoder(torch.randn(batch, channels, 8, 8))
        assert graphs == [False, False]  # one static graph per batch size, the first one reused
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("name,scope", [
    ("sd", "model"), ("sd", "blocks"),
    pytest.param("sd3", "blocks", marks=pytest.mark.slow), pytest.param("flux", "blocks", marks=pytest.mark.slow),
])
def test_compiled_rollout_gives_the_same_gradient(name, scope):
    """torch.compile of the denoiser (every call, grad and no-grad) and of the VAE decoder, whole or block by
    block, through the default plan (merged LoRA, checkpointing as in training).

    The "aot_eager" backend traces the graphs that inductor would compile (Dynamo capture, AOTAutograd's
    joint forward/backward and partition) without generating kernels, so this runs in seconds on a CPU;
    inductor's own kernels are compared against eager on the GPU by `scripts/benchmark.py --compare-eager`.
    With blocks, every block call must run compiled, as one graph: as many compiled forwards as the same
    rollout run eagerly makes block calls (no fallback to eager at dynamo's recompilation limit, no graph break
    inside a block). SD 1.x in the fast tier (SDXL's UNet has the same block classes); SD3's and FLUX's
    transformer blocks in the slow one.
    """
    import torch._dynamo

    from alignprop import families
    from alignprop.lora import add_lora
    from helpers import randomize_lora, tiny_components

    family = families.get(name)
    components = tiny_components(family)
    add_lora(components.denoiser, rank=4, alpha=4.0, targets=family.lora_targets)
    randomize_lora(components.denoiser)
    size = 32 if name == "flux" else None  # tiny FLUX's native 256 px would make this the slowest test of the suite
    reference = run(components, family, 3, plain(components, checkpoint_grad_steps=False), size)  # uncompiled
    calls, kinds = [], set()

    def record(module, args, kwargs):
        calls.append(type(module).__name__)
        # What dynamo specialises a block's graph on: its class, its inputs' shapes, strides and grad flags, the
        # grad mode, and the plain settings of the block and its submodules (not which block it is).
        tensors = [(a.shape, a.stride(), a.requires_grad) for a in (*args, *kwargs.values())
                   if isinstance(a, torch.Tensor)]
        settings = tuple((type(m).__name__, tuple(sorted((k, v) for k, v in vars(m).items()
                                                         if isinstance(v, (bool, int, float, str)))))
                         for m in module.modules())
        kinds.add((type(module).__name__, tuple(tensors), torch.is_grad_enabled(), settings))

    graphs, forwards = [], []
    torch._dynamo.reset()
    try:
        prepared = speed.prepare(family, components, compiling({"speed.compile_scope": scope}),
                                 backend=counting_backend(graphs, forwards))
        assert prepared.compiled
        names = (*family.compile_blocks, *family.vae_compile_blocks)
        hooks = [m.register_forward_pre_hook(record, with_kwargs=True)
                 for m in (*components.denoiser.modules(), *components.vae.decoder.modules())
                 if type(m).__name__ in names]
        with torch.compiler.set_stance("force_eager"):  # the same calls, run eagerly, recorded
            run(components, family, 3, prepared, size)
        for hook in hooks:
            hook.remove()
        assert not graphs
        ours = run(components, family, 3, prepared, size)
    finally:
        torch._dynamo.reset()
    if scope == "model":
        assert len(graphs) >= 3, "the denoiser (with and without grad) and the decoder should each have been captured"
    else:
        # every call compiled; one graph per kind of call, shared by all the blocks of that kind
        assert len(forwards) == len(calls) and len(graphs) == len(kinds), (len(forwards), len(graphs), len(kinds))
    assert_same(ours, reference, rtol=2e-4)


def test_precision_the_hardware_lacks(monkeypatch):
    from alignprop.errors import ConfigError

    with pytest.raises(ConfigError, match=r"config.mixed_precision='fp16' needs a CUDA GPU"):
        speed.check_precision("fp16", torch.device("cpu"))
    speed.check_precision("bf16", torch.device("cpu"))
    speed.check_precision("no", torch.device("cpu"))
    # The GPU branch, without a GPU: a card that has no bf16 (pre-Ampere) and one that has it.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    with pytest.raises(ConfigError, match=r"config.mixed_precision='bf16': this GPU has no bf16"):
        speed.check_precision("bf16", torch.device("cuda", 0))
    speed.check_precision("fp16", torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    speed.check_precision("bf16", torch.device("cuda", 0))


def test_auto_precision_is_bf16_where_the_gpu_has_it_else_fp16_and_fp32_on_the_cpu(monkeypatch):
    from alignprop.errors import ConfigError

    assert speed.auto_precision("cpu") == "no" and speed.inference_dtype("auto") == (
        torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else
        torch.float16 if torch.cuda.is_available() else torch.float32)
    for has_bf16, expected in ((True, "bf16"), (False, "fp16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, _v=has_bf16, **kwargs: _v)
        assert speed.auto_precision(torch.device("cuda", 0)) == expected
        cfg = config(overrides={"mixed_precision": "auto"})
        assert speed.resolve_precision(cfg, torch.device("cuda", 0)) == expected
        assert cfg.mixed_precision == expected  # replaced in place, before accelerate sees it
    cfg = config(overrides={"mixed_precision": "auto"})
    assert speed.resolve_precision(cfg, "cpu") == "no" and cfg.mixed_precision == "no"
    # An explicit value is kept, and still checked against the hardware.
    cfg = config(overrides={"mixed_precision": "fp16"})
    with pytest.raises(ConfigError, match=r"needs a CUDA GPU"):
        speed.resolve_precision(cfg, "cpu")


def test_torch_flags_follow_the_config_and_flux_keeps_cudnn_attention_off():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
             torch.backends.cuda.cudnn_sdp_enabled())
    try:
        for name, expected in (("config/align_prop.py:aesthetic", True), ("config/align_prop.py:hps_flux", False),
                               ("config/align_prop.py:hps_sd35", True)):
            flags = config(name).speed
            speed.set_torch_flags(flags)
            assert torch.backends.cuda.cudnn_sdp_enabled() is expected, name
            assert torch.backends.cuda.matmul.allow_tf32 is flags.tf32 and torch.backends.cudnn.benchmark
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.backends.cudnn.benchmark = saved[2]
        torch.backends.cuda.enable_cudnn_sdp(saved[3])


def test_the_plan_in_force_is_described_at_start_up():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    # (the scripts describe the plan after resolve_precision: "auto" is bf16 or fp16 by then; fp16 shows its scale)
    assert speed.describe(config("config/align_prop.py:aesthetic", {"mixed_precision": "fp16"}), cuda) == (
        "speed plan: fp16, GradScaler from 65536; torch.compile on (whole networks); each grad step's denoiser call "
        "recomputed in backward, but the last 1, inside it each block again; decoder in chunks of 1 image(s), "
        "recomputed; reward kept; cuDNN attention allowed")
    assert speed.describe(config("config/align_prop.py:aesthetic_sdxl"), cuda) == (
        "speed plan: bf16; torch.compile on (its repeated blocks); each grad step's denoiser call recomputed in "
        "backward, inside it each block again; decoder in chunks of 1 image(s), recomputed (and its blocks); reward "
        "kept; cuDNN attention allowed")
    flux = config("config/align_prop.py:hps_flux", {"speed.checkpoint_grad_steps": False, "speed.decode_chunk": 0})
    assert speed.describe(flux, cpu) == (
        "speed plan: bf16; torch.compile off; every grad step keeps its activations; decoder all at once, recomputed; "
        "reward kept; cuDNN attention off")
    assert speed.describe(config("config/align_prop.py:tiny"), cpu).startswith("speed plan: fp32; torch.compile off;")
    blocks = config("config/align_prop.py:aesthetic", {"speed.compile_scope": "blocks"})
    assert "; torch.compile on (its repeated blocks); " in speed.describe(blocks, cuda)
    fp8 = config("config/align_prop.py:aesthetic", {"speed.fp8_prefix": True, "mixed_precision": "bf16"})
    assert speed.describe(fp8, cuda).startswith(
        "speed plan: bf16; a training rollout's steps without gradients in float8 matmuls; torch.compile on ")
    # A plan chosen from the memory budget overrides the config's checkpointing (the config above keeps the last
    # step and recomputes each block; the plan of a 15 GiB budget on an H200 kept the blocks and no step)
    from alignprop.memory import MemoryPlan

    chosen = MemoryPlan(checkpoint_blocks=False, uncheckpointed_steps=0, predicted_bytes=1, budget_bytes=2, cost=200,
                        fits=True, k_max=50)
    assert "; each grad step's denoiser call recomputed in backward (the memory plan's); decoder" in speed.describe(
        config("config/align_prop.py:aesthetic"), cuda, chosen)
    chosen = dataclasses.replace(chosen, checkpoint_blocks=True, uncheckpointed_steps=11)
    assert ("; each grad step's denoiser call recomputed in backward, but the last 11, inside it each block again (the "
            "memory plan's); decoder") in speed.describe(config("config/align_prop.py:aesthetic"), cuda, chosen)


def test_ddp_runs_the_single_process_graph(lora_components, sd, monkeypatch):
    """Through DDP (a world-size-1 gloo group), the compiled grad call is one graph, not DDPOptimizer's split at
    the bucket boundaries (buckets made tiny here so that it would split), and gives the unwrapped gradients."""
    import socket

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    compiled_graphs = []
    torch._dynamo.reset()
    prepared = speed.prepare(sd, lora_components, compiling(), backend=counting_backend(compiled_graphs))
    unwrapped = run(lora_components, sd, 2, prepared)
    before = len(compiled_graphs)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=1, rank=0)
    try:
        monkeypatch.setattr(torch.distributed, "_DEFAULT_FIRST_BUCKET_BYTES", 256)
        ddp = DistributedDataParallel(lora_components.denoiser, bucket_cap_mb=256 / 2**20)
        torch._dynamo.reset()  # recompile inside DDP's forward, where DDPOptimizer would act
        compiled_graphs.clear()
        rollout = Rollout(sd, lora_components, SampleSpec(STEPS, 7.5), prepared, ddp)
        latents = rollout.initial_latents(2, torch.Generator().manual_seed(0))
        images = rollout(rollout.encode(PROMPTS), latents, grad_suffix(STEPS, 2))
        wrapped = images.detach(), lora_grads(lora_components.denoiser, fixed_reward(images).sum())
    finally:
        dist.destroy_process_group()
    # the no-grad graph, the grad graph (one, unsplit) and the decoder's: as many as without DDP
    assert len(compiled_graphs) == before
    assert_same(wrapped, unwrapped)


@pytest.mark.parametrize("value", ["block", "", True])
def test_a_wrong_compile_scope_is_named_with_the_choices(value):
    from alignprop import config as configs
    from alignprop.errors import ConfigError

    c = config("config/align_prop.py:tiny")
    c.speed.compile_scope = value if isinstance(value, str) else "x"
    if not isinstance(value, str):
        with pytest.raises(TypeError):  # ml_collections keeps the key a string
            c.speed.compile_scope = value
    with pytest.raises(ConfigError, match=r"config.speed.compile_scope='(block|x|)': must be one of 'blocks', 'model'"):
        configs.check(c, 1)


def test_compile_workers_are_stopped_or_left_behind_within_the_timeout(monkeypatch):
    name = "torch._inductor.async_compile"
    monkeypatch.delitem(sys.modules, name, raising=False)
    assert speed.stop_compile_workers(0.01)  # nothing compiled in this process: nothing to stop
    calls = []
    monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(shutdown_compile_workers=lambda: calls.append(1)))
    assert speed.stop_compile_workers(5.0) and calls == [1]
    release = threading.Event()  # a pool that hangs in its shutdown, as torch's did on the H200 after a cold start
    monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(shutdown_compile_workers=release.wait))
    exits = []
    monkeypatch.setattr(speed.os, "_exit", exits.append)
    start = time.perf_counter()
    try:
        assert not speed.stop_compile_workers(0.2)
        speed.leave(0.2)
        assert exits == [0]  # out without waiting, after the timeout
        assert time.perf_counter() - start < 3.0
    finally:
        release.set()
    calls.clear()
    monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(shutdown_compile_workers=lambda: calls.append(1)))
    speed.leave(5.0)
    assert calls == [1] and exits == [0]  # stopped in time: the normal exit follows


def test_fp8_prefix_changes_only_the_sampling_steps_without_gradients(lora_components, sd, monkeypatch):
    from alignprop import methods

    prepared = speed.prepare(sd, lora_components, config(overrides={"speed.fp8_prefix": True}).speed)
    assert len(prepared.fp8_layers) >= 10  # the attention projections (merged LoRA) and the feed-forwards
    exact = dataclasses.replace(prepared, fp8_layers=())  # the same model, never switched to float8
    unet = lora_components.denoiser

    def rollout_of(prep):
        return Rollout(sd, lora_components, SampleSpec(STEPS, 7.5), prep, prep.denoiser)

    def run(prep, plan, penalty=None):
        """Images, LoRA gradients (of a fixed reward, plus the penalty) and penalty values of one training rollout."""
        rollout = rollout_of(prep)
        cond = rollout.encode(PROMPTS)
        images = methods.images(rollout, cond, rollout.initial_latents(2, torch.Generator().manual_seed(0)), plan,
                                torch.Generator().manual_seed(5), penalty)
        loss = fixed_reward(images).sum() + (torch.cat(penalty).sum() if penalty is not None else 0)
        return images.detach(), lora_grads(unet, loss), [p.detach() for p in penalty or []]

    # Every step with gradients: nothing runs in float8, not even the KL penalty's reference (a no-grad call)
    every = methods.Plan(tuple(range(STEPS)))
    (images_a, grads_a, kl_a), (images_b, grads_b, kl_b) = run(prepared, every, []), run(exact, every, [])
    assert torch.equal(images_a, images_b) and all(torch.equal(a, b) for a, b in zip(kl_a, kl_b))
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_b) and kl_b[0].abs().sum() > 0

    # K=1: the prefix runs in float8, so the images differ a little...
    seen = []
    grad_denoise = prepared.grad_denoise

    def capturing(denoise, num_steps):
        step = grad_denoise(denoise, num_steps)
        return lambda latents, i: (seen.append(latents.detach().clone()), step(latents, i))[1]

    monkeypatch.setattr(prepared, "grad_denoise", capturing)
    last = methods.Plan((STEPS - 1,))
    images, grads, _ = run(prepared, last)
    monkeypatch.undo()
    images_exact, _, _ = run(exact, last)
    assert not torch.equal(images, images_exact)
    assert (images - images_exact).abs().mean() < 0.01  # 0.0041 of [0, 1] here (3 float8 steps of 4, tiny model)
    # ...and the grad step is exact: the same gradients as the exact model's step from the latents it was given
    rollout = rollout_of(exact)
    cond = rollout.encode(PROMPTS)
    reference = rollout.decode(rollout.latents(cond, seen[0], (STEPS - 1,), start=STEPS - 1))
    torch.testing.assert_close(images, reference.detach(), rtol=0, atol=0)
    reference_grads = lora_grads(unet, fixed_reward(reference).sum())
    assert all(torch.equal(grads[n], reference_grads[n]) for n in grads) and any(g.abs().sum() > 0 for g in grads.values())

    # Evaluation (a rollout outside training's) stays exact
    latents = rollout.initial_latents(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(rollout_of(prepared)(cond, latents), rollout_of(exact)(cond, latents))


def test_fp8_prefix_is_checked_before_any_model_loads(monkeypatch):
    from alignprop.errors import ConfigError

    from alignprop import config as configs

    with pytest.raises(ConfigError, match=r"config.speed.fp8_prefix='maybe': must be a boolean \(True or False\)"):
        configs.override(config(), "speed.fp8_prefix", "maybe")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ConfigError, match=r"fp8_prefix=True: NVIDIA A100-SXM4-80GB \(compute capability 8.0\) has "
                                          r"no float8 matmuls"):
        speed.check_fp8(True, torch.device("cuda"))
    speed.check_fp8(False, torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    speed.check_fp8(True, torch.device("cuda"))  # Hopper
    speed.check_fp8(True, torch.device("cpu"))  # the CPU has them (torch._scaled_mm), slowly: the tests use it


def test_compiled_fp8_prefix_gives_the_eager_images_and_evaluation_stays_exact(lora_components, sd):
    """Compiled, the float8 and the exact no-grad calls are different graphs (dynamo guards on each layer's
    `fp8_on`): a training rollout's steps without gradients run float8 as eagerly, an evaluation between two such
    rollouts runs exact; the benchmark's timed forward reuses the prefix's graph (#20 item 6: no measurement
    compiles anew). (The grad steps never run float8: the test above; compiled: the tests further up.)"""
    import contextlib

    import torch._dynamo

    from alignprop import methods, profiling

    graphs = []

    def prefix_evaluation_prefix(prepared, between=lambda rollout: None):
        rollout = Rollout(sd, lora_components, SampleSpec(STEPS, 7.5), prepared, prepared.denoiser)
        cond = rollout.encode(PROMPTS)
        latents = rollout.initial_latents(2, torch.Generator().manual_seed(0))
        with torch.no_grad():
            first = methods.images(rollout, cond, latents, methods.Plan(()))
            between(rollout)
            return first, rollout(cond, latents), methods.images(rollout, cond, latents, methods.Plan(()))

    def timed_forward(rollout):
        seen = len(graphs)
        trainer = types.SimpleNamespace(rollout=rollout, accelerator=types.SimpleNamespace(
            autocast=contextlib.nullcontext))
        seconds, tflop = profiling.denoiser_throughput(trainer, len(PROMPTS))
        assert seconds > 0 and tflop > 0 and len(graphs) == seen  # no new graph

    torch._dynamo.reset()
    try:
        prepared = speed.prepare(sd, lora_components, compiling({"speed.fp8_prefix": True}),
                                 backend=counting_backend(graphs))
        with torch.compiler.set_stance("force_eager"):
            eager = prefix_evaluation_prefix(prepared)
        assert not graphs
        compiled = prefix_evaluation_prefix(prepared, timed_forward)
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 3  # the denoiser without grad in float8 and exact; the decoder
    for ours, reference in zip(compiled, eager):
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    assert (eager[1] - eager[0]).abs().max() > 1e-3  # float8 and exact differ: the graphs were not mixed up


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sdxl", "sd3", "flux"])
def test_fp8_prefix_on_every_family(name):
    """The float8 prefix on each family's denoiser (the SD UNet: the tests above, fast tier): the LoRA-adapted
    projections and the feed-forwards switched (never LoRA's own factors), a training rollout close to the exact one
    and not equal to it, its grad step's LoRA gradients finite."""
    from alignprop import families, methods
    from alignprop.lora import add_lora
    from helpers import randomize_lora, tiny_components

    family = families.get(name)
    components = tiny_components(family)
    add_lora(components.denoiser, rank=4, alpha=4.0, targets=family.lora_targets)
    randomize_lora(components.denoiser)
    prepared = speed.prepare(family, components, config(overrides={"speed.fp8_prefix": True}).speed)
    switched = {id(m) for m in prepared.fp8_layers}
    named = dict(components.denoiser.named_modules())
    fits = [n for n, m in named.items() if hasattr(m, "in_features") and m.in_features % 16 == m.out_features % 16 == 0]
    lora_parts = [n for n in named if n.rsplit(".", 2)[-2:][0] in ("lora_A", "lora_B") or n.endswith(".base_layer")]
    assert not switched & {id(named[n]) for n in lora_parts}  # LoRA's own factors and base layers: never
    lora = [n for n in fits if n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "add_q_proj", "to_add_out", "0")
            and hasattr(named[n], "lora_A")]
    feed_forward = [n for n in fits if ".ff." in n and n not in lora_parts and not hasattr(named[n], "lora_A")]
    assert lora and feed_forward and all(id(named[n]) in switched for n in lora + feed_forward)
    size = 32  # (the tiny models' native sizes take longer)

    def images(prep):
        rollout = Rollout(family, components, SampleSpec(STEPS, 3.5, height=size, width=size), prep, prep.denoiser)
        latents = rollout.initial_latents(2, torch.Generator().manual_seed(0))
        return methods.images(rollout, rollout.encode(PROMPTS), latents, methods.Plan((STEPS - 1,)))

    fast = images(prepared)
    grads = lora_grads(components.denoiser, fixed_reward(fast).sum())
    exact = images(dataclasses.replace(prepared, fp8_layers=())).detach()
    assert not torch.equal(fast.detach(), exact) and (fast.detach() - exact).abs().mean() < 0.01
    assert all(torch.isfinite(g).all() for g in grads.values()) and any(g.abs().sum() > 0 for g in grads.values())
