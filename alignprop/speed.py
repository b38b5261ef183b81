"""The speed layer: everything that makes a rollout fast or light, prepared in one place (`config.speed`).

The families and the sampling loop compute the same numbers with or without it; each part is measured in
BENCHMARKS.md and checked against plain autograd in the tests:
- the merged LoRA forward (`kernels.merge_lora_forward`; peft's side branch doubles the UNet forward);
- `torch.compile` of the denoiser, for the steps with and without gradients, and of the VAE decoder;
- the checkpoint plan: each grad step's denoiser call recomputed in backward (but the last
  `uncheckpointed_steps`), block checkpointing inside it, the decoder run and recomputed in chunks (and
  block checkpointing inside it), optionally the reward model recomputed;
- the reward towers' patch embeddings as matrix products (`kernels.use_patch_matmuls`);
- TF32 and cuDNN's algorithm search.
"""

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sys
import threading
import time

import torch
from torch.autograd.profiler import record_function
from torch.utils.checkpoint import checkpoint

from alignprop import kernels
from alignprop.errors import ConfigError

logger = logging.getLogger(__name__)


def set_torch_flags(speed):
    """The global torch settings of `config.speed`: TF32 matmuls and convolutions; cuDNN's algorithm search
    (the shapes of a run are fixed, so its timing of each convolution shape is paid once); whether attention may
    use cuDNN's kernels."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = speed.tf32
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.enable_cudnn_sdp(speed.cudnn_attention)


def inference_dtype(mixed_precision):
    """The dtype of the frozen weights for accelerate's `mixed_precision` setting ("auto": this machine's)."""
    if mixed_precision == "auto":
        mixed_precision = auto_precision()
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def auto_precision(device=None):
    """What `config.mixed_precision="auto"` means on `device` (default: the GPU if there is one): bf16 on a GPU
    that has it (Ampere and newer), fp16 on an older GPU, fp32 ("no") on the CPU.

    Not fp16 where bf16 exists: at K=1, fp16 leaves 99.6% of the LoRA-B gradient entries of one rollout exactly
    zero at the GradScaler's 2^16 (68% even at 2^24), bf16 0.004%, fp32 none (SD 1.5 size, batch 4, H200;
    BENCHMARKS.md). bf16 keeps fp32's exponent range, so no loss scale is needed."""
    if _device(device).type != "cuda":
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def resolve_precision(config, device=None):
    """`config.mixed_precision` with "auto" replaced (in place) by `auto_precision(device)`, then checked against
    the hardware (`check_precision`). Call it before accelerate's Accelerator is built. Returns the value."""
    device = _device(device)
    if config.mixed_precision == "auto":
        config.mixed_precision = auto_precision(device)
    check_precision(config.mixed_precision, device)
    check_fp8(config.speed.fp8_prefix, device)
    return config.mixed_precision


def _device(device):
    """`device` as a torch.device; None: the GPU if there is one, else the CPU."""
    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


def check_precision(mixed_precision, device):
    """fp16/bf16 need hardware that has them: fp16 autocast and GradScaler need CUDA; bf16 needs Ampere+ or CPU."""
    if device.type == "cpu" and mixed_precision == "fp16":
        raise ConfigError("config.mixed_precision='fp16' needs a CUDA GPU; use 'no' (or 'bf16') on the CPU.")
    if device.type == "cuda" and mixed_precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError("config.mixed_precision='bf16': this GPU has no bf16; use 'fp16'.")


def check_fp8(fp8_prefix, device):
    """float8 matmuls need a GPU that has them (compute capability 8.9: Ada, Hopper and newer), or the CPU."""
    if not fp8_prefix or device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise ConfigError(f"config.speed.fp8_prefix=True: {name} (compute capability {major}.{minor}) has no float8 "
                          "matmuls (8.9 and newer: Ada, Hopper, Blackwell); set it to False.")


def describe(config, device, memory_plan=None):
    """The speed and memory plan in force, in one line for the start-up log. `memory_plan` (memory.MemoryPlan): the
    checkpoint plan chosen from `config.speed.memory_budget_gib`, which overrides the config's own."""
    sp = config.speed
    compiled = sp.compile and device.type != "cpu"
    scope = f" ({'its repeated blocks' if sp.compile_scope == 'blocks' else 'whole networks'})" if compiled else ""
    uncheckpointed, blocks = sp.uncheckpointed_steps, sp.checkpoint_blocks
    if memory_plan is not None:
        uncheckpointed, blocks = memory_plan.uncheckpointed_steps, memory_plan.checkpoint_blocks
    if not sp.checkpoint_grad_steps:
        grad = "every grad step keeps its activations"
    else:
        kept = f", but the last {uncheckpointed}" if uncheckpointed else ""
        grad = "each grad step's denoiser call recomputed in backward" + kept
        grad += ", inside it each block again" if blocks else ""
        grad += " (the memory plan's)" if memory_plan is not None else ""
    chunk = f"in chunks of {sp.decode_chunk} image(s)" if sp.decode_chunk else "all at once"
    decode = f"decoder {chunk}" + (", recomputed" if sp.checkpoint_decode else "")
    decode += " (and its blocks)" if sp.checkpoint_decode and sp.checkpoint_vae_blocks else ""
    scale = f", GradScaler from {config.train.grad_scale_init:g}" if config.mixed_precision == "fp16" else ""
    precision = "fp32" if config.mixed_precision == "no" else config.mixed_precision
    fp8 = "; a training rollout's steps without gradients in float8 matmuls" if sp.fp8_prefix else ""
    return (f"speed plan: {precision}{scale}{fp8}; torch.compile {'on' if compiled else 'off'}{scope}; {grad}; "
            f"{decode}; reward {'recomputed' if sp.checkpoint_reward else 'kept'}; cuDNN attention "
            f"{'allowed' if sp.cudnn_attention else 'off'}")


COMPILE_SCOPES = ("blocks", "model")


def problems(config):
    """Start-up checks of `config.speed`."""
    out = []
    if not isinstance(config.speed.compile_cache, str) or not config.speed.compile_cache:
        out.append(f"config.speed.compile_cache={config.speed.compile_cache!r}: must be 'auto', 'off' or a file path")
    if config.speed.compile_scope not in COMPILE_SCOPES:
        out.append(f"config.speed.compile_scope={config.speed.compile_scope!r}: must be one of "
                   f"{', '.join(map(repr, COMPILE_SCOPES))}")
    budget = config.speed.memory_budget_gib
    if budget not in ("auto", "off") and not _positive_number(budget):
        out.append(f"config.speed.memory_budget_gib={budget!r}: must be 'auto', 'off' or a number of GiB > 0")
    for key, what in (
        ("uncheckpointed_steps", "0: checkpoint every grad step"),
        ("decode_chunk", "0: decode all at once"),
    ):
        value = config.speed[key]
        if not (isinstance(value, int) and value >= 0):
            out.append(f"config.speed.{key}={value!r}: must be an int >= 0 ({what})")
    return out


def _positive_number(value):
    try:
        return not isinstance(value, bool) and float(value) > 0
    except (TypeError, ValueError):
        return False


def prepare_scorer(scorer, device, dtype):
    """A reward model on `device` in `dtype`, its patch-embedding convolutions computed as matrix products."""
    kernels.use_patch_matmuls(scorer)
    return scorer.to(device, dtype=dtype)


@dataclasses.dataclass
class Prepared:
    """What the rollout runs: ready-made denoiser, grad-step wrapper and decoder (see `prepare`)."""

    denoiser: torch.nn.Module  # runs the steps without gradients (compiled in place when `compiled`)
    vae: torch.nn.Module
    compiled: bool = False
    checkpoint_grad_steps: bool = True
    uncheckpointed_steps: int = 0  # the last this many grad steps keep their activations
    decode_chunk: int = 0  # decode this many images at a time (0: all)
    checkpoint_decode: bool = False
    fp8_layers: tuple = ()  # the denoiser's Linear layers that can run float8 matmuls (config.speed.fp8_prefix)

    def sampling_prefix(self):
        """Inside: a training rollout, whose steps without gradients may run float8 matmuls (fp8_prefix)."""
        return kernels.fp8_matmuls(self.fp8_layers, True)

    def exact(self):
        """Inside: the no-grad calls exact again (the KL penalty's reference prediction)."""
        return kernels.fp8_matmuls(self.fp8_layers, False)

    def grad_denoise(self, denoise, num_steps):
        """`denoise(latents, i)` for the steps with gradients: checkpointed but for the last steps."""
        first_kept = num_steps - self.uncheckpointed_steps

        def step(latents, i):
            if self.compiled and torch.is_grad_enabled() and not latents.requires_grad:
                # Every grad step then sees latents that require grad (as all but the first do anyway): one
                # compiled graph for all of them instead of two. Costs one small input gradient.
                latents = latents.detach().requires_grad_()
            if self.checkpoint_grad_steps and i < first_kept and torch.is_grad_enabled():
                return checkpoint(denoise, latents, i, use_reentrant=False)
            return denoise(latents, i)

        return step

    def decode(self, vae_input):
        """VAE decoder output in [-1, 1] of VAE-ready latents, in chunks, each recomputed in backward if asked.

        The decoder runs in the VAE's own dtype: a VAE kept in fp32 under fp16 autocast (SDXL's, which
        overflows in fp16) runs with autocast off; one in the autocast dtype runs as before."""

        def decode(z):
            return self.vae.decode(z, return_dict=False)[0]

        chunks = vae_input.split(self.decode_chunk or len(vae_input))
        device = vae_input.device.type
        own_dtype = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) != self.vae.dtype
        autocast_off = torch.autocast(device, enabled=False) if own_dtype else contextlib.nullcontext()
        with record_function("alignprop.decode"), autocast_off:
            if self.checkpoint_decode and torch.is_grad_enabled():
                return torch.cat([checkpoint(decode, z, use_reentrant=False) for z in chunks])
            return torch.cat([decode(z) for z in chunks])


def prepare(family, components, speed, backend="inductor"):
    """Make `components` fast in place and return what the rollout runs (`config.speed` decides).

    The LoRA adapter named "default" (training's) runs merged into its weights; `compile` compiles the
    denoiser in place, so every call of it (through DDP too, forward and backward) runs compiled, and the
    VAE decoder likewise, with static shapes: each batch shape (training's, evaluation's) gets its own
    graph instead of a slower shape-generic one. `compile_scope` says what is compiled: each network whole
    ("model") or only `family`'s repeated blocks inside it ("blocks"). On the CPU, inductor is skipped
    (minutes of C++ compilation for little gain); tests pass backend="aot_eager" to trace without generating
    kernels.
    """
    denoiser = components.denoiser
    kernels.merge_lora_forward(denoiser)
    fp8_layers = tuple(kernels.use_fp8_matmuls(denoiser)) if speed.fp8_prefix else ()
    if speed.checkpoint_blocks:
        denoiser.enable_gradient_checkpointing()
    if speed.checkpoint_vae_blocks:
        components.vae.enable_gradient_checkpointing()
    compiled = speed.compile
    if compiled and next(denoiser.parameters()).device.type == "cpu" and backend == "inductor":
        logger.info("torch.compile skipped on the CPU (config.speed.compile)")
        compiled = False
    if compiled:
        # Under DDP, dynamo's DDPOptimizer splits the compiled grad graph at DDP's bucket boundaries (so that each
        # bucket's all-reduce can start while the backward goes on): more graphs to compile, no fusion across the
        # cuts, for the overlap of an all-reduce of a few MB of LoRA gradients that happens once per optimizer
        # step. Off: a DDP-wrapped denoiser runs the very graphs of the single-process run.
        torch._dynamo.config.optimize_ddp = False
        options = {"backend": backend, "dynamic": False}
        if speed.compile_scope == "blocks":
            compile_blocks(denoiser, family.compile_blocks, options)
            compile_blocks(components.vae.decoder, family.vae_compile_blocks, options)
        else:
            denoiser.compile(**options)
            components.vae.decoder.compile(**options)
    return Prepared(
        denoiser=denoiser,
        vae=components.vae,
        compiled=compiled,
        checkpoint_grad_steps=speed.checkpoint_grad_steps,
        uncheckpointed_steps=speed.uncheckpointed_steps,
        decode_chunk=speed.decode_chunk,
        checkpoint_decode=speed.checkpoint_decode,
        fp8_layers=fp8_layers,
    )


# Regional compilation keeps one graph per (block class, input shapes, grad mode, block settings): a UNet's resnets
# alone come in ~12 shapes at SDXL size, with and without grad, for the training and the evaluation batch, and the
# VAE decoder's resnets share their code: far more than dynamo's default of 8 recompilations of one function, after
# which it runs that function eagerly for good (tests/test_speed.py checks that every block call runs compiled).
BLOCK_RECOMPILE_LIMIT = 128


def compile_blocks(module, names, options):
    """Compile, in place, every submodule of `module` whose class is named in `names` (regional compilation:
    blocks of one class share their compiled graph wherever their shapes agree)."""
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, BLOCK_RECOMPILE_LIMIT)
    dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 4 * BLOCK_RECOMPILE_LIMIT)
    blocks = [m for m in module.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"config.speed.compile_scope='blocks': {type(module).__name__} has no {', '.join(names)}; "
                         "use compile_scope='model'")
    for block in blocks:
        block.compile(**options)


def compile_cache_file(config):
    """The file that keeps this kind of run's compiled kernels between runs (torch.compile's portable cache
    artifacts), or None: `speed.compile_cache` ("auto": one file per run shape under the user's cache folder,
    $XDG_CACHE_HOME/alignprop/compile; a path; "off"), and only when the denoiser is compiled on a GPU."""
    setting = config.speed.compile_cache
    if not config.speed.compile or setting == "off" or not torch.cuda.is_available():
        return None
    if setting != "auto":
        return os.path.expanduser(setting)
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "alignprop", "compile",
                        f"{compile_cache_key(config)}.bin")


def compile_cache_key(config):
    """What the compiled graphs of a run depend on: torch, the card, the model, the shapes, precision and plan."""
    s, t = config.sample, config.train
    shape = {
        "torch": torch.__version__, "card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "model": [config.model.family, config.model.source], "precision": config.mixed_precision,
        "sample": [s.num_steps, s.height, s.width, s.eval_batch_size], "batch": t.batch_size_per_gpu,
        "method": t.method, "reward": config.reward_fn, "speed": dict(config.speed),
    }
    return hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_compile_cache(path):
    """Load saved compiled kernels before the first compiled call: a warm start skips most of the compilation."""
    if path and os.path.isfile(path):
        with open(path, "rb") as f:
            torch.compiler.load_cache_artifacts(f.read())
        logger.info("compiled kernels loaded from %s", path)


def save_compile_cache(path):
    """Save what torch.compile compiled so far (atomically: a half-written file is never loaded)."""
    artifacts = torch.compiler.save_cache_artifacts() if path else None
    if not artifacts:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        f.write(artifacts[0])
    os.replace(path + ".tmp", path)
    logger.info("compiled kernels saved to %s (%.1f MB)", path, len(artifacts[0]) / 1e6)


def reward_call(reward_fn, speed):
    """The reward function as training calls it: recomputed in backward with `speed.checkpoint_reward`."""
    if not speed.checkpoint_reward:
        return reward_fn

    def checkpointed(images, prompts, metadata):
        return checkpoint(reward_fn, images, prompts, metadata, use_reentrant=False)

    return checkpointed


def stop_compile_workers(timeout_s=30.0):
    """Stop inductor's compile-worker processes now, waiting at most `timeout_s`. Returns False where they did not
    stop in time: the caller should then leave with os._exit, its work saved. At interpreter exit torch waits up to
    300 s for them; on an H200 a compiled SD 1.5 benchmark that had saved its results and printed its table was still
    not gone 70 s later (torch issue #162199, "inductor's process pool seems to time out while cleaning up after a
    cold start"). Nothing to do where nothing was compiled."""
    module = sys.modules.get("torch._inductor.async_compile")
    if module is None:
        return True
    start = time.perf_counter()
    worker = threading.Thread(target=module.shutdown_compile_workers, daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        logger.warning("torch.compile's compile workers did not stop within %.0f s; leaving without waiting for them",
                       timeout_s)
        return False
    logger.info("torch.compile's compile workers stopped in %.1f s", time.perf_counter() - start)
    return True


def leave(timeout_s=30.0):
    """The end of a script that may have compiled: output flushed, then out, at most `timeout_s` after its work."""
    if not stop_compile_workers(timeout_s):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
