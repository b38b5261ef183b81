"""MPS: our scorer with the official checkpoint's tensors == a copy of the official forward with the same weights."""

import sys
import types

import pytest
import torch
from torch import einsum

import reference_preprocess as ref
from alignprop.rewards import mps, towers
from alignprop.rewards.loading import BadWeightsError, WeightsNotFoundError
from alignprop.tokenizers import clip_tokenizer
from helpers import config, make_reward

PROMPT = "a photo of a cat on a sofa"


def _cfg(**overrides):
    cfg = config().reward.mps
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A whole pickled model as the official MPS_overall_checkpoint.pth is (torch.save of trainer's CLIPModel),
    saved under a module name that does not exist when it is read back."""
    names = ("trainer", "trainer.models", "trainer.models.clip_model")
    for name in names:
        sys.modules[name] = types.ModuleType(name)

    class CLIPModel(torch.nn.Module):  # trainer/models/clip_model.py's wrapper: .model (HF CLIP) + .cross_model
        def __init__(self, model, cross_model):
            super().__init__()
            self.model, self.cross_model = model, cross_model

    CLIPModel.__module__ = CLIPModel.__qualname__ = "trainer.models.clip_model"
    CLIPModel.__qualname__ = "CLIPModel"
    sys.modules["trainer.models.clip_model"].CLIPModel = CLIPModel
    torch.manual_seed(0)
    model = CLIPModel(towers.tiny_clip(seed=5), mps.CrossModel(**mps.TINY_CROSS))
    with torch.no_grad():  # nonzero LayerNorm scales and larger weights than the init: the test can tell
        for p in model.cross_model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("mps") / "MPS_overall_checkpoint.pth"
    torch.save(model, path)
    for name in names:
        del sys.modules[name]
    return str(path), model.state_dict()


# A copy of the official forward (Kwai-Kolors/MPS, trainer/models/clip_model.py `CLIPModel.forward` and
# `XCLIPModel.get_text_features/get_image_features`, trainer/models/cross_modeling.py, and the README's
# `infer_example` score), written over the state dict with einsum as the source does; the CLIP towers are
# transformers' CLIPModel, as the official XCLIPModel subclasses it.
def _layer_norm(x, sd, k):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], sd[k + ".weight"], sd[k + ".bias"])


def _swiglu(x):
    x, gate = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * x


def official_cross_model(sd, query, context, mask, heads, dim_head):
    for i in range(len({k.split(".")[2] for k in sd if k.startswith("cross_model.layers.")})):
        p = f"cross_model.layers.{i}."
        # Residual(CrossAttention(parallel_ff=True))
        x = _layer_norm(query, sd, p + "0.fn.norm")
        q = (x @ sd[p + "0.fn.to_q.weight"].T)
        q = q.view(*q.shape[:2], heads, dim_head).permute(0, 2, 1, 3) * dim_head**-0.5
        k, v = (context @ sd[p + "0.fn.to_kv.weight"].T).chunk(2, dim=-1)
        sim = einsum("b h i d, b j d -> b h i j", q, k) + mask.unsqueeze(1).repeat(1, heads, 1, 1).to(q.dtype)
        attn = (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1)
        out = einsum("b h i j, b j d -> b h i d", attn, v).permute(0, 2, 1, 3).flatten(2)
        out = out @ sd[p + "0.fn.to_out.weight"].T
        out = out + _swiglu(x @ sd[p + "0.fn.ff.0.weight"].T) @ sd[p + "0.fn.ff.2.weight"].T
        query = out + query
        # Residual(ParallelTransformerBlock)
        x = _layer_norm(query, sd, p + "1.fn.norm")
        fused = (heads * dim_head, dim_head, dim_head, sd[p + "1.fn.ff_out.1.weight"].shape[1] * 2)
        q, k, v, ff = (x @ sd[p + "1.fn.fused_attn_ff_proj.weight"].T).split(fused, dim=-1)
        q = q.view(*q.shape[:2], heads, dim_head).permute(0, 2, 1, 3)
        seq = torch.arange(x.shape[1], dtype=torch.float32)
        freqs = einsum("i , j -> i j", seq, sd[p + "1.fn.rotary_emb.inv_freq"])
        pos = torch.cat((freqs, freqs), dim=-1)
        rot = lambda t: torch.cat((-t.chunk(2, -1)[1], t.chunk(2, -1)[0]), dim=-1)  # noqa: E731
        q, k = [(t * pos.cos()) + (rot(t) * pos.sin()) for t in (q, k)]
        sim = einsum("b h i d, b j d -> b h i j", q * dim_head**-0.5, k)
        attn = (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1)
        out = einsum("b h i j, b j d -> b h i d", attn, v).permute(0, 2, 1, 3).flatten(2)
        query = out @ sd[p + "1.fn.attn_out.weight"].T + _swiglu(ff) @ sd[p + "1.fn.ff_out.1.weight"].T + query
    return query


def official_score(clip, sd, text_inputs, image_inputs, condition_inputs, heads, dim_head):
    clip.text_model.eos_token_id = 2
    text_out = clip.text_model(input_ids=text_inputs)
    text_f, text_eos = clip.text_projection(text_out[0]), clip.text_projection(text_out[1])
    image_f = clip.visual_projection(clip.vision_model(pixel_values=image_inputs)[0])
    condition_f = clip.text_projection(clip.text_model(input_ids=condition_inputs)[0])
    sim_text_condition = einsum("b i d, b j d -> b j i", text_f, condition_f)
    sim_text_condition = torch.max(sim_text_condition, dim=1, keepdim=True)[0]
    sim_text_condition = sim_text_condition / sim_text_condition.max()
    mask = torch.where(sim_text_condition > 0.01, 0, float("-inf")).repeat(1, image_f.shape[1], 1)
    image_token = official_cross_model(sd, image_f, text_f, mask, heads, dim_head)[:, 0, :]
    text_eos, image_token = [t / t.norm(dim=-1, keepdim=True) for t in (text_eos, image_token)]
    return clip.logit_scale.exp() * torch.diagonal(einsum("bd,cd->bc", text_eos, image_token))


@pytest.mark.parametrize("shape", [(48, 67), (67, 48), (512, 703)])
def test_equals_the_official_forward_on_its_preprocessing(checkpoint, shape, monkeypatch):
    """Same tensors (read from the pickled model without its code), CLIPImageProcessor's pixels from uint8.

    Measured (scores -0.57..1.18): on the same pixels within 3e-7; from the images 5e-4-2.4e-3 (the processor's
    uint8 rounding), 0.12-0.27 with the former bilinear preprocessing.
    """
    path, state = checkpoint
    scorer = mps.build_scorer(_cfg(path=path))
    for name, tensor in state.items():
        if not name.endswith("position_ids"):
            torch.testing.assert_close(scorer.state_dict()[name], tensor, msg=name)
    arrays = [ref.photo(name, *shape) for name in ("astronaut", "coffee")]
    tokenize = lambda texts: clip_tokenizer()(texts, max_length=77, padding="max_length", truncation=True,  # noqa: E731
                                              return_tensors="pt").input_ids
    with torch.no_grad():
        expected = official_score(scorer.model, state, tokenize([PROMPT] * 2),
                                  torch.cat([ref.transformers_clip(a, 32) for a in arrays]),
                                  tokenize([mps.CONDITION] * 2), mps.TINY_CROSS["heads"], mps.TINY_CROSS["dim_head"])
        ours = scorer(torch.cat([ref.as_tensor(a) for a in arrays]), [PROMPT] * 2)
    assert (expected[0] - expected[1]).abs() > 0.01  # two images score differently: the test can tell
    torch.testing.assert_close(ours, expected, rtol=0, atol=5e-3)
    pixels = torch.cat([ref.transformers_clip(a, 32) for a in arrays])
    monkeypatch.setattr(mps, "clip_preprocess", lambda *args, **kwargs: pixels)  # the architecture alone
    with torch.no_grad():
        torch.testing.assert_close(scorer(torch.zeros(2, 3, 8, 8), [PROMPT] * 2), expected, rtol=0, atol=1e-5)


def test_tiny_reward_shape_dtype_and_gradient():
    images = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(0)).requires_grad_()
    rewards, _, _ = make_reward("mps")(images, [PROMPT, "two dogs"], [{}, {}])
    assert rewards.shape == (2,) and rewards.dtype == torch.float32 and torch.isfinite(rewards).all()
    rewards.sum().backward()
    assert images.grad.abs().sum() > 0


def test_state_dict_files_and_errors(checkpoint, tmp_path):
    path, state = checkpoint
    torch.save({"state_dict": state}, tmp_path / "state.pth")
    mps.build_scorer(_cfg(path=str(tmp_path / "state.pth")))
    bad = {k: v for k, v in state.items() if "cross_model.layers.0.0.fn.to_q" not in k}
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(BadWeightsError, match=r"does not fit MPS's cross model.*to_q"):
        mps.build_scorer(_cfg(path=str(tmp_path / "bad.pth")))
    (tmp_path / "cut.pth").write_bytes(open(path, "rb").read()[:2000])
    with pytest.raises(BadWeightsError, match=r"could not be read: corrupt, truncated"):
        mps.build_scorer(_cfg(path=str(tmp_path / "cut.pth")))
    with pytest.raises(WeightsNotFoundError, match=r"does not exist. Point config.reward.mps.path"):
        mps.build_scorer(_cfg(path=str(tmp_path / "missing.pth")))
    with pytest.raises(WeightsNotFoundError, match=r"config.reward.mps.path is unset and so is config.reward.mps.repo"):
        mps.build_scorer(config("config/align_prop.py:aesthetic").reward.mps)
