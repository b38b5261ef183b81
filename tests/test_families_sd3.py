"""The SD3/3.5 family against independent references: StableDiffusion3Pipeline (encoding, the no-grad rollout,
LoRA loading), plain autograd through an Euler flow loop written from the formulas, the scheduler's own step,
and the published parameter counts; plus the flow schedule, the tiny T5 tokenizer and the text memory knobs."""

import json
import math

import ml_collections
import pytest
import torch
from safetensors import safe_open

from alignprop import families, lora
from alignprop.families import Source, flow, parse_source
from alignprop.families.loading import ModelLoadError
from alignprop.sampling import FlowMatchSchedule
from alignprop.tokenizers import t5_tokenizer
from flow_reference import (CountingDenoiser, assert_grads_close, check_last_k_calls, euler_images, make_rollout,
                            sd3_sigmas, x_T)
from helpers import config, fixed_reward, lora_grads, randomize_lora, tiny_components, train_in_process

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS, GUIDANCE = 4, 7.0
PROMPTS = ["a photo of a cat", "an owl on a branch"]


@pytest.fixture
def sd3():
    return families.get("sd3")


@pytest.fixture
def lora_components(sd3):
    c = tiny_components(sd3, "sd35")
    lora.add_lora(c.denoiser, 4, 8.0, sd3.lora_targets)
    randomize_lora(c.denoiser, scale=0.1)
    return c


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_tiny_t5_tokenizer_is_fixed_and_t5_shaped():
    tok = t5_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.model_max_length) == (0, 1, 2, 512)
    ids = tok(["a photo of a cat", "An owl!"], padding="max_length", max_length=8, truncation=True).input_ids
    # Hand-written vocabulary: the same ids in every process ("▁a" "▁photo" "▁of" "▁a" "▁cat" "</s>" pad pad).
    assert ids[0] == [tok.convert_tokens_to_ids(p) for p in ("▁a", "▁photo", "▁of", "▁a", "▁cat")] + [1, 0, 0]
    assert tok.convert_ids_to_tokens(ids[1][:4]) == ["▁A", "n", "▁owl", "!"] and 2 not in ids[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flow_schedule_is_the_schedulers_step_bit_for_bit(dtype):
    from diffusers import FlowMatchEulerDiscreteScheduler

    schedule = FlowMatchSchedule(dict(shift=3.0), STEPS)
    torch.testing.assert_close(schedule.sigmas, torch.tensor(sd3_sigmas(STEPS), dtype=torch.float32), rtol=0, atol=1e-6)
    assert [round(s, 4) for s in schedule.sigmas.tolist()] == [1.0, 0.8577, 0.6022, 0.0089, 0.0]
    assert all(t.dtype == torch.float32 and t.ndim == 0 for t in schedule.model_timesteps)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(STEPS)
    g = torch.Generator().manual_seed(0)
    ours = theirs = torch.randn(2, 16, 4, 4, generator=g).to(dtype)
    for i, t in enumerate(scheduler.timesteps):
        v = torch.randn(2, 16, 4, 4, generator=g).to(dtype)
        again = schedule.step(i, v, ours)
        ours, theirs = schedule.step(i, v, ours), scheduler.step(v, t, theirs).prev_sample
        assert torch.equal(ours, theirs) and torch.equal(again, ours) and ours.dtype == dtype  # stateless


@pytest.mark.parametrize("use_t5", [True, False])
def test_encode_is_the_pipelines_encoding(sd3, use_t5):
    c = sd3.load(Source("tiny", "sd35"), ml_collections.ConfigDict({"use_t5": use_t5}))
    sd3.freeze_and_cast(c, torch.device("cpu"), torch.float32)
    assert len(c.text_encoders) == (3 if use_t5 else 2)
    pe, negative_pe, pooled, negative_pooled = sd3.pipeline(c).encode_prompt(PROMPTS, None, None)
    ours, negative = sd3.encode(c, PROMPTS), sd3.negative(c, (32, 32))
    assert ours["encoder_hidden_states"].shape == (2, 77 + 256, 96) and ours["pooled_projections"].shape == (2, 80)
    assert torch.equal(ours["encoder_hidden_states"], pe) and torch.equal(ours["pooled_projections"], pooled)
    assert torch.equal(ours["encoder_hidden_states"][:, :77, 80:], torch.zeros(2, 77, 16))  # CLIP zero-padded
    assert torch.count_nonzero(ours["encoder_hidden_states"][:, 77:]) == (2 * 256 * 96 if use_t5 else 0)
    # The "" negative is encoded once at batch 1 (the pipeline encodes it B times): CLIP's projection rounds
    # differently at another batch size (measured: 0 for the hidden states, 3e-8 for the pooled vector).
    for key, theirs in (("encoder_hidden_states", negative_pe), ("pooled_projections", negative_pooled)):
        torch.testing.assert_close(negative[key].expand_as(theirs), theirs, rtol=0, atol=1e-6)


def tiny(sd3, variant="sd35", dtype=torch.float32, use_t5=True):
    c = sd3.load(Source("tiny", variant), ml_collections.ConfigDict({"use_t5": use_t5}))
    sd3.freeze_and_cast(c, torch.device("cpu"), dtype)
    return c


@pytest.mark.parametrize("variant,size,dtype,use_t5", [
    ("sd35", None, torch.float32, True), ("sd35", (32, 48), torch.float32, True),
    ("sd3", (48, 32), torch.float32, True),
    ("sd35", (32, 32), torch.float32, False), ("sd35", (48, 32), torch.bfloat16, True),
])
def test_no_grad_rollout_equals_the_pipeline(sd3, variant, size, dtype, use_t5):
    c = tiny(sd3, variant, dtype, use_t5)
    rollout = make_rollout(sd3, c, STEPS, GUIDANCE, *(size or (None, None)))
    latents, cond, negative = x_T(rollout), rollout.encode(PROMPTS), rollout.negative
    pipe = sd3.pipeline(c)
    pipe.set_progress_bar_config(disable=True)
    run = dict(height=rollout.height, width=rollout.width, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
               output_type="pt")
    with torch.no_grad():
        ours = rollout(cond, latents)
    # Given our conditioning, the pipeline's loop and decode give the same bits...
    same_cond = pipe(prompt_embeds=cond["encoder_hidden_states"], pooled_prompt_embeds=cond["pooled_projections"],
                     negative_prompt_embeds=negative["encoder_hidden_states"].expand(2, -1, -1),
                     negative_pooled_prompt_embeds=negative["pooled_projections"].expand(2, -1),
                     latents=latents.clone(), **run).images
    assert ours.shape == (2, 3, rollout.height, rollout.width) and ours.dtype == dtype
    assert torch.equal(ours, same_cond)
    # ...and from the prompts (its negative encoded at batch 2: 1e-6 apart in fp32, see the encoding test;
    # measured max |diff| of the images 1.4e-6 fp32, and 0 in bf16).
    torch.testing.assert_close(ours, pipe(PROMPTS, latents=latents.clone(), **run).images, atol=1e-5, rtol=1e-5)


def test_guidance_and_t5_change_the_images(sd3):
    """Guard against references that ignore guidance or T5: each changes the output."""
    outs = {}
    for guidance, use_t5 in ((GUIDANCE, True), (1.0, True), (GUIDANCE, False)):
        c = tiny(sd3, use_t5=use_t5)
        rollout = make_rollout(sd3, c, STEPS, guidance, 32, 32)
        with torch.no_grad():
            outs[guidance, use_t5] = rollout(rollout.encode(PROMPTS), x_T(rollout))
    assert (outs[GUIDANCE, True] - outs[1.0, True]).abs().max() > 1e-3
    assert (outs[GUIDANCE, True] - outs[GUIDANCE, False]).abs().max() > 1e-3


def reference_grads(sd3, c, rollout, detach_first):
    """LoRA gradients of plain autograd through the Euler loop with batched CFG, from the formulas' sigmas."""
    cond, negative = rollout.encode(PROMPTS), rollout.negative
    pe = torch.cat([negative["encoder_hidden_states"].expand(2, -1, -1), cond["encoder_hidden_states"]])
    pooled = torch.cat([negative["pooled_projections"].expand(2, -1), cond["pooled_projections"]])

    def velocity(x, sigma):
        t = torch.full((4,), sigma * 1000, dtype=torch.float32)
        out = c.denoiser(hidden_states=torch.cat([x, x]), timestep=t, encoder_hidden_states=pe,
                         pooled_projections=pooled).sample
        uncond, text = out.chunk(2)
        return uncond + GUIDANCE * (text - uncond)

    images = euler_images(velocity, x_T(rollout), sd3_sigmas(STEPS), c.vae, detach_first)
    return lora_grads(c.denoiser, fixed_reward(images).sum())


@pytest.mark.parametrize("k,checkpoint", [(1, True), (3, False), (STEPS, False), (STEPS, True)])
def test_lora_gradients_equal_plain_autograd(sd3, lora_components, k, checkpoint):
    rollout = make_rollout(sd3, lora_components, STEPS, GUIDANCE, 32, 48, checkpoint_grad_steps=checkpoint)
    images = rollout(rollout.encode(PROMPTS), x_T(rollout), range(STEPS - k, STEPS))
    ours = lora_grads(lora_components.denoiser, fixed_reward(images).sum())
    assert_grads_close(ours, reference_grads(sd3, lora_components, rollout, STEPS - k))
    assert any("lora_A" in n and g.abs().sum() > 0 for n, g in ours.items())
    # SD3's last block is context_pre_only: its text-stream projections do not reach the output (no gradient).
    assert all(g.abs().sum() == 0 for n, g in ours.items() if "transformer_blocks.1.attn.add_q_proj" in n)


@pytest.mark.parametrize("k,checkpoint", [(1, False), (2, True), (STEPS, False)])
def test_exactly_the_last_k_transformer_calls_receive_gradient(sd3, lora_components, k, checkpoint):
    counting = CountingDenoiser(lora_components.denoiser)
    rollout = make_rollout(sd3, lora_components, STEPS, GUIDANCE, 32, 32, denoiser=counting,
                           checkpoint_grad_steps=checkpoint, uncheckpointed_steps=0)
    check_last_k_calls(rollout, counting, rollout.encode(PROMPTS), x_T(rollout), k, checkpoint,
                       lambda images: fixed_reward(images).sum())


def test_saved_lora_loads_into_the_pipeline_and_gives_our_rollout(sd3, lora_components, tmp_path):
    config = lora_components.denoiser.peft_config["default"]
    lora.save_lora(sd3, lora_components.denoiser, config, str(tmp_path))
    with safe_open(str(tmp_path / lora.LORA_WEIGHTS), "pt") as f:  # peft's keys, as diffusers' SD3 script saves
        assert all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in f.keys())
    pipe = sd3.pipeline(tiny_components(sd3, "sd35"))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(tmp_path))
    assert pipe.get_active_adapters() == ["default_0"]
    rollout = make_rollout(sd3, lora_components, STEPS, GUIDANCE, 32, 32)
    cond, negative, latents = rollout.encode(PROMPTS), rollout.negative, x_T(rollout)
    with torch.no_grad():
        ours = rollout(cond, latents)
    theirs = pipe(prompt_embeds=cond["encoder_hidden_states"], pooled_prompt_embeds=cond["pooled_projections"],
                  negative_prompt_embeds=negative["encoder_hidden_states"].expand(2, -1, -1),
                  negative_pooled_prompt_embeds=negative["pooled_projections"].expand(2, -1), latents=latents.clone(),
                  num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=32, width=32, output_type="pt").images
    assert torch.equal(ours, theirs)  # alpha 8 != rank 4: the saved metadata gives the scale
    other = tiny_components(sd3, "sd35")
    lora.add_lora(other.denoiser, 4, 8.0, sd3.lora_targets)
    lora.load_into(other.denoiser, sd3, str(tmp_path))  # resume reads it back exactly
    a, b = lora_components.denoiser.state_dict(), other.denoiser.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_published_architectures_have_their_parameter_counts(sd3):
    # On the meta device (REFERENCE_MODELS.md §9): SD3-medium 2.03B, SD3.5-medium 2.24B (+ its fp32 pos_embed
    # buffer), SD3.5-large 8.06B; CLIP-L 123.7M, CLIP-G 694.7M (with projections), T5-XXL 4.76B, VAE 83.8M.
    counts = {v: count(sd3.load(Source("random", v), device="meta").denoiser) for v in ("sd3m", "sd35m", "sd35l")}
    assert counts == {"sd3m": 2_028_328_000, "sd35m": 2_243_171_520, "sd35l": 8_056_627_520}
    c = sd3.load(Source("random", "sd35m"), device="meta")
    assert [count(m) for m in (*c.text_encoders, c.vae)] == [123_650_304, 694_659_840, 4_762_310_656, 83_819_683]
    assert c.vae.config.scaling_factor == 1.5305 and c.vae.config.shift_factor == 0.0609
    assert c.scheduler.config.shift == 3.0 and not c.scheduler.config.use_dynamic_shifting
    assert sd3.image_size(c) == (1024, 1024) and sd3.size_factor(c) == 16


def test_fast_init_computes_the_buffers_of_a_plain_build():
    from diffusers import SD3Transformer2DModel

    from alignprop.families.sd3 import TINY

    with flow.fast_init("cpu"):
        fast = SD3Transformer2DModel(**TINY["sd35"])
    plain = SD3Transformer2DModel(**TINY["sd35"])
    assert all(p.dtype == torch.bfloat16 for p in fast.parameters()) and torch.get_default_dtype() == torch.float32
    assert fast.pos_embed.pos_embed.dtype == torch.float32
    assert torch.equal(fast.pos_embed.pos_embed, plain.pos_embed.pos_embed)


def test_local_folder_loads_and_t5_can_be_dropped(sd3, tmp_path):
    c = tiny_components(sd3, "sd35")
    sd3.pipeline(c).save_pretrained(tmp_path)
    loaded = sd3.load(parse_source(str(tmp_path), "main", sd3), config(overrides={"model.family": "sd3"}).model)
    assert len(loaded.text_encoders) == 3 and loaded.max_sequence_length == 256
    sa, sb = c.denoiser.state_dict(), loaded.denoiser.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    no_t5 = sd3.load(parse_source(str(tmp_path), "main", sd3), ml_collections.ConfigDict({"use_t5": False}))
    assert len(no_t5.text_encoders) == len(no_t5.tokenizers) == 2


def test_offline_hub_id_error(sd3, offline):
    with pytest.raises(ModelLoadError) as e:
        sd3.load(parse_source("stabilityai/stable-diffusion-3.5-medium", "main", sd3))
    message = str(e.value)
    assert "Stable Diffusion 3/3.5 from config.model.source='stabilityai/stable-diffusion-3.5-medium'" in message
    assert "not a local folder, so a hub id" in message and "hf download" in message


def test_offloaded_text_encoders_move_only_to_encode_and_the_cache_encodes_each_prompt_once(sd3, monkeypatch):
    options = ml_collections.ConfigDict({"offload_text_encoders": True, "cache_prompt_embeddings": True})
    c = sd3.load(Source("tiny", "sd35"), options)
    moves, calls = [], []
    for i, encoder in enumerate(c.text_encoders):
        original = encoder.to
        monkeypatch.setattr(encoder, "to", lambda *a, i=i, original=original, **k: moves.append((i, a, k)) or
                            original(*a, **k))
        encoder.register_forward_hook(lambda *_, i=i: calls.append(i))
    sd3.freeze_and_cast(c, torch.device("cpu"), torch.float32)
    assert [(i, a[0] if a else k.get("device")) for i, a, k in moves] == [(0, "cpu"), (1, "cpu"), (2, "cpu")]
    moves.clear()
    cached = sd3.encode(c, PROMPTS + PROMPTS[:1])
    assert sorted(calls) == [0, 0, 1, 1, 2, 2]  # each prompt once, alone
    assert [a for _, a, _ in moves] == [(torch.device("cpu"),)] * 3 + [("cpu",)] * 3  # to the device and back
    calls.clear()
    again = sd3.encode(c, PROMPTS[::-1])
    assert not calls and torch.equal(again["pooled_projections"], cached["pooled_projections"][[1, 0]])
    plain = tiny_components(sd3, "sd35")
    alone = sd3.encode(plain, PROMPTS[:1])
    assert torch.equal(cached["encoder_hidden_states"][:1], alone["encoder_hidden_states"])
    torch.testing.assert_close(cached["encoder_hidden_states"], sd3.encode(plain, PROMPTS + PROMPTS[:1])[
        "encoder_hidden_states"], rtol=0, atol=1e-5)


def test_precompute_encodes_the_prompt_set_in_one_visit_and_steps_never_move_the_encoders(sd3, monkeypatch):
    options = ml_collections.ConfigDict({"offload_text_encoders": True, "cache_prompt_embeddings": True})
    c = sd3.load(Source("tiny", "sd35"), options)
    sd3.freeze_and_cast(c, torch.device("cpu"), torch.float32)
    visits, calls = [], []
    original = flow.text_encoders_on
    monkeypatch.setattr(flow, "text_encoders_on", lambda *a: visits.append(1) or original(*a))
    c.text_encoders[2].register_forward_hook(lambda *_: calls.append(1))
    prompts = ["a cat", "a dog", "a red bird", "a cat", "a boat"]
    count, gib = sd3.precompute_prompts(c, prompts, max_gib=1.0)
    assert count == 4 and len(calls) == 4 and len(visits) == 1  # every prompt in one visit of the encoders
    entry = c.prompt_cache["a dog"]  # [1, 77 + 256, 96] hidden states and [1, 80] pooled, fp32
    assert entry["encoder_hidden_states"].shape == (1, 333, 96) and entry["pooled_projections"].shape == (1, 80)
    assert gib == 4 * (333 * 96 + 80) * 4 / 2**30
    visits.clear(), calls.clear()
    cond = sd3.encode(c, ["a boat", "a cat"])
    assert not visits and not calls  # a training step's encode: from the cache, the encoders untouched
    plain = tiny_components(sd3, "sd35")
    assert torch.equal(cond["encoder_hidden_states"][:1], sd3.encode(plain, ["a boat"])["encoder_hidden_states"])
    # Over the limit: only the first prompt is encoded (its size decides), the others wait to be drawn.
    fresh = sd3.load(Source("tiny", "sd35"), options)
    assert sd3.precompute_prompts(fresh, prompts, max_gib=1e-9) == (0, None) and list(fresh.prompt_cache) == ["a cat"]
    # Families without a prompt cache (and flow ones with the cache off) do nothing.
    assert sd3.precompute_prompts(plain, prompts, max_gib=1.0) == (0, 0.0) and not plain.prompt_cache
    sd = families.get("sd")
    assert sd.precompute_prompts(tiny_components(sd, "sd1"), prompts, max_gib=1.0) == (0, 0.0)


def test_config_problems_name_the_keys(sd3):
    from alignprop import config as configs

    found = configs.problems(config("config/align_prop.py:tiny_sd3", {
        "sample.eta": 0.3, "model.max_sequence_length": 0, "sample.height": 40,
        "model.precompute_prompt_embeddings_max_gib": -1}))
    assert "config.sample.eta=0.3: Stable Diffusion 3/3.5 samples with the deterministic flow-matching Euler step; " \
           "set it to 0" in found
    assert any(p.startswith("config.model.max_sequence_length=0: must be an int in [1, 512]") for p in found)
    assert any(p.startswith("config.sample.height=40: must be a positive multiple of 16") for p in found)
    assert "config.model.precompute_prompt_embeddings_max_gib=-1.0: must be a number >= 0 (0: encode each prompt when " \
           "first drawn)" in found
    assert not configs.problems(config("config/align_prop.py:hps_sd35"))


@pytest.mark.slow
def test_tiny_sd3_run_trains(tmp_path, monkeypatch):
    visits = []
    original = flow.fill_prompt_cache
    monkeypatch.setattr(flow, "fill_prompt_cache", lambda *a: visits.append(original(*a)) or visits[-1])
    train_in_process(config("config/align_prop.py:tiny_sd3", {"run_name": "sd3", "logdir": str(tmp_path)}))
    run = tmp_path / "sd3"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 8 and all(r["nonfinite"] == 0 and r["grad_norm"] > 0 for r in records)
    assert all(math.isfinite(r["loss"]) for r in records)
    # Every prompt encoded at start-up (the negative, then the whole set at once): no step or evaluation encodes.
    assert [n for n, _ in visits[:2]] == [1, 49] and len(visits) > 2 and not any(n for n, _ in visits[2:]), visits
    initial = json.loads((run / "eval_initial.json").read_text())["reward_mean"]
    final = json.loads((run / "eval_final.json").read_text())["reward_mean"]
    assert final > initial  # same prompts, same noise: the trained LoRA scores higher
    pipe = families.get("sd3").pipeline(tiny_components(families.get("sd3"), "sd35"))
    pipe.load_lora_weights(str(run))
    assert pipe.get_active_adapters() == ["default_0"]

