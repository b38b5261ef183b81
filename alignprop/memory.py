"""The checkpoint plan chosen from the memory a run may use (`config.speed.memory_budget_gib`).

Each grad step's denoiser call is recomputed in backward (its input is all that stays), or keeps its activations
until the backward (the last `uncheckpointed_steps`); inside a call, each block may be recomputed again
(`checkpoint_blocks`). Counted in denoiser forwards (a backward ~ 2), a grad step costs

    kept, blocks off: 3        recomputed, blocks off: 4        kept, blocks on: 4        recomputed, blocks on: 5

and holds, until its backward, its activations (kept, blocks off), its blocks' inputs (kept, blocks on) or its input
alone (recomputed). At start-up, one guided grad call of the real batch is run eagerly with the blocks on and off,
and one decode and reward pass, forward and backward, on the card itself (`measure`); `choose` then takes the
cheapest plan at the run's largest K whose predicted peak fits the budget, and the start-up log prints it.
"""

import dataclasses
import logging

import torch

logger = logging.getLogger(__name__)

GIB = 2**30
# A grad step's cost in denoiser forwards: (checkpoint_blocks, activations kept) -> forwards.
COST = {(False, True): 3, (False, False): 4, (True, True): 4, (True, False): 5}
# The predicted peak's variable part is multiplied by this (allocator fragmentation, eager-vs-compiled slack).
SLACK = 1.15


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Bytes measured on the card at start-up (`measure`)."""

    base: int  # allocated before the first step (weights, LoRA, prompt caches) and the optimizer's states
    held: dict  # {checkpoint_blocks: bytes one grad call keeps for its backward}
    step_peak: dict  # {checkpoint_blocks: peak above base of one grad call, forward and backward}
    post: int  # peak above base of one decode chunk and the reward on the batch, forward and backward


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    checkpoint_blocks: bool
    uncheckpointed_steps: int
    predicted_bytes: int
    budget_bytes: int
    cost: int  # denoiser forwards of the grad steps at the largest K
    fits: bool
    k_max: int  # the largest K of the run, which the plan was chosen for

    def describe(self):
        blocks = "each block recomputed inside" if self.checkpoint_blocks else "blocks kept inside"
        verdict = "fits" if self.fits else "does NOT fit: the lowest-memory plan"
        return (f"memory plan: the last {self.uncheckpointed_steps} grad step(s) keep their activations, the rest "
                f"recomputed in backward, {blocks}; predicted peak {self.predicted_bytes / GIB:.2f} GiB of a "
                f"{self.budget_bytes / GIB:.2f} GiB budget ({verdict}); {self.cost} denoiser forwards for the grad "
                f"steps at K={self.k_max}")


def predicted_peak(sizes, blocks, kept, k_max):
    """Bytes at the step's peak with `kept` of `k_max` grad steps keeping their activations. The backward runs
    from the last step to the first, so the peak is the largest of: the kept steps' activations under the decoder
    and the reward; the kept steps' backward (the last one's transient on the others'); and, once the kept steps
    are freed, one recomputed step's forward and backward."""
    kept = min(kept, k_max)
    held, step = sizes.held[blocks], sizes.step_peak[blocks]
    phases = [kept * held + sizes.post]
    if kept:
        phases.append((kept - 1) * held + step)
    if kept < k_max:
        phases.append(step)
    return sizes.base + int(SLACK * max(phases))


def cost(blocks, kept, k_max):
    kept = min(kept, k_max)
    return kept * COST[(blocks, True)] + (k_max - kept) * COST[(blocks, False)]


def choose(sizes, budget_bytes, k_max):
    """The plan with the fewest denoiser forwards at K = `k_max` whose predicted peak fits `budget_bytes` (ties:
    the lighter one); none fits: the lowest-memory plan (blocks recomputed, every grad step recomputed)."""
    candidates = []
    for blocks in (False, True):
        if blocks not in sizes.held:  # its probe did not fit on the card
            continue
        for kept in range(k_max + 1):
            peak = predicted_peak(sizes, blocks, kept, k_max)
            candidates.append((cost(blocks, kept, k_max), peak, blocks, kept))
    fitting = [c for c in candidates if c[1] <= budget_bytes]
    if fitting:
        c, peak, blocks, kept = min(fitting)
        return MemoryPlan(blocks, kept, peak, budget_bytes, c, True, k_max)
    peak = predicted_peak(sizes, True, 0, k_max) if True in sizes.held else sizes.base
    return MemoryPlan(True, 0, peak, budget_bytes, cost(True, 0, k_max), False, k_max)


def budget_bytes(setting, device):
    """`speed.memory_budget_gib` in bytes: a number of GiB, or "auto": what this process may allocate on the card
    (what it holds now and what is free) less a margin of 6% of the card or 2 GiB, whichever is more."""
    if setting != "auto":
        return int(float(setting) * GIB)
    free, total = torch.cuda.mem_get_info(device)
    return int(torch.cuda.memory_reserved(device) + free - max(2 * GIB, 0.06 * total))


class CudaMeter:
    """The CUDA caching allocator's counters: what `measure` reads."""

    def __init__(self, device):
        self.device = device

    def allocated(self):
        return torch.cuda.memory_allocated(self.device)

    def reset_peak(self):
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self):
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)


def set_block_checkpointing(denoiser, on):
    (denoiser.enable_gradient_checkpointing if on else denoiser.disable_gradient_checkpointing)()


def measure(rollout, reward_fn, params, items, autocast, meter):
    """`Sizes` of one training step of this batch (`items`: (prompt, metadata) pairs), measured with `meter` (the card's allocator): one
    guided grad call at the middle timestep with the blocks recomputed and kept, eagerly (compiled graphs keep no
    more), and the decode of one chunk and the reward on the batch. Leaves no gradient, graph or RNG state
    behind, and block checkpointing as it found it. A probe that runs out of memory marks its plan as not
    fitting."""
    denoiser = rollout.prepared.denoiser
    blocks_before = bool(getattr(denoiser, "is_gradient_checkpointing", False))
    prompts, metadata = [p for p, _ in items], [m for _, m in items]
    batch = len(prompts)
    generator = torch.Generator(rollout.device).manual_seed(0)
    cond = rollout.encode(prompts)
    latents = rollout.initial_latents(batch, generator)
    guided = rollout.guided(denoiser, cond, batch)
    timestep = rollout.schedule.model_timesteps[len(rollout.schedule) // 2]
    optimizer_states = 3 * sum(p.numel() * 4 for p in params)  # the fp32 gradient and AdamW's two moments
    base = meter.allocated() + optimizer_states
    held, step_peak = {}, {}
    try:
        with torch.compiler.set_stance("force_eager"), autocast():
            for blocks in (False, True):
                set_block_checkpointing(denoiser, blocks)
                try:
                    held[blocks], step_peak[blocks] = _grad_call(guided, latents, timestep, meter)
                except torch.cuda.OutOfMemoryError:
                    logger.info("memory plan: one grad call with checkpoint_blocks=%s does not fit on the card", blocks)
                finally:
                    for p in params:
                        p.grad = None
                    _release()
            post = _decode_and_reward(rollout, reward_fn, latents, prompts, metadata, meter)
    finally:
        set_block_checkpointing(denoiser, blocks_before)
    return Sizes(base, held, step_peak, post)


def _grad_call(guided, latents, timestep, meter):
    x = latents.detach().requires_grad_()
    start = meter.allocated()
    meter.reset_peak()
    out = guided(x, timestep)
    held = meter.allocated() - start - out.numel() * out.element_size()
    out.float().square().mean().backward()
    del out
    return max(held, 0), meter.peak() - start


def _decode_and_reward(rollout, reward_fn, latents, prompts, metadata, meter):
    """Peak above the current allocation of the decoder on one chunk and of the reward on the batch, each
    forward and backward (they run one after the other in a step, so the larger counts), plus the images."""
    start = meter.allocated()
    chunk = rollout.prepared.decode_chunk or len(latents)
    meter.reset_peak()
    z = latents[:chunk].detach().requires_grad_()
    rollout.decode(z).float().mean().backward()
    decode_peak = meter.peak() - start
    del z
    _release()
    images = torch.rand(len(latents), 3, rollout.height, rollout.width, device=latents.device,
                        generator=torch.Generator(latents.device).manual_seed(0)).requires_grad_()
    start = meter.allocated()
    meter.reset_peak()
    rewards, _, _ = reward_fn(images, prompts, metadata)
    rewards.float().sum().backward()
    reward_peak = meter.peak() - start
    image_bytes = images.numel() * images.element_size()
    del images, rewards
    _release()
    return max(decode_peak, reward_peak) + 2 * image_bytes


def _release():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def plan_memory(config, rollout, reward_fn, params, items, method, autocast):
    """Choose and apply the checkpoint plan of `config.speed.memory_budget_gib` ("off": the config's own
    `checkpoint_blocks` and `uncheckpointed_steps`). Returns the MemoryPlan, or None where none was chosen (off;
    not on a GPU, where the budget is the card's memory; or with every grad step kept by the config)."""
    setting = config.speed.memory_budget_gib
    if setting == "off":
        return None
    if rollout.device.type != "cuda" or not config.speed.checkpoint_grad_steps:
        why = "needs a GPU" if rollout.device.type != "cuda" else "plans recomputed grad steps, and " \
            "config.speed.checkpoint_grad_steps=False keeps every one"
        logger.info("memory plan: the config's checkpoint plan (config.speed.memory_budget_gib %s)", why)
        return None
    k_max = method.max_grad_calls
    sizes = measure(rollout, reward_fn, params, items, autocast, CudaMeter(rollout.device))
    plan = choose(sizes, budget_bytes(setting, rollout.device), k_max)
    apply(plan, rollout.prepared)
    logger.info(plan.describe())
    if not plan.fits:
        logger.warning("the lowest-memory plan is predicted to need %.2f GiB, over config.speed.memory_budget_gib "
                       "(%.2f GiB): the run may run out of memory; lower config.train.batch_size_per_gpu",
                       plan.predicted_bytes / GIB, plan.budget_bytes / GIB)
    return plan


def apply(plan, prepared):
    """Put `plan` in force: the denoiser's block checkpointing and the grad steps that keep their activations."""
    set_block_checkpointing(prepared.denoiser, plan.checkpoint_blocks)
    prepared.uncheckpointed_steps = plan.uncheckpointed_steps
