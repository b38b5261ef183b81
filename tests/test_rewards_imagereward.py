"""ImageReward: our towers with the official checkpoint's weights == a copy of the official forward, same weights."""

import pytest
import torch
import torch.nn.functional as F

import reference_preprocess as ref
from alignprop.rewards import imagereward
from alignprop.rewards.loading import BadWeightsError, WeightsNotFoundError
from alignprop.tokenizers import tiny_bert_tokenizer
from helpers import config, make_reward

PROMPTS = ["a photo of a cat", "an oil painting of a lighthouse at night"]
VISION, TEXT = imagereward.TINY_VISION, dict(imagereward.TINY_TEXT, vocab_size=len(tiny_bert_tokenizer()))


def official_state_dict(seed=0):
    """A random state dict with the names and shapes of the official ImageReward.pt (tiny sizes)."""
    g = torch.Generator().manual_seed(seed)
    C, P, I = VISION["hidden_size"], VISION["patch_size"], VISION["intermediate_size"]
    H, TI, V = TEXT["hidden_size"], TEXT["intermediate_size"], TEXT["vocab_size"]
    n = (VISION["image_size"] // P) ** 2
    shapes = {"cls_token": (1, 1, C), "pos_embed": (1, n + 1, C), "patch_embed.proj.weight": (C, 3, P, P),
              "patch_embed.proj.bias": (C,), "norm.weight": (C,), "norm.bias": (C,)}
    for i in range(VISION["num_hidden_layers"]):
        for name, shape in {"norm1.weight": (C,), "norm1.bias": (C,), "attn.qkv.weight": (3 * C, C),
                            "attn.qkv.bias": (3 * C,), "attn.proj.weight": (C, C), "attn.proj.bias": (C,),
                            "norm2.weight": (C,), "norm2.bias": (C,), "mlp.fc1.weight": (I, C), "mlp.fc1.bias": (I,),
                            "mlp.fc2.weight": (C, I), "mlp.fc2.bias": (C,)}.items():
            shapes[f"blocks.{i}.{name}"] = shape
    state = {f"blip.visual_encoder.{k}": v for k, v in shapes.items()}
    text = {"embeddings.word_embeddings.weight": (V, H), "embeddings.position_embeddings.weight": (64, H),
            "embeddings.LayerNorm.weight": (H,), "embeddings.LayerNorm.bias": (H,)}
    for i in range(TEXT["num_hidden_layers"]):
        for part, kv_width in (("attention", H), ("crossattention", C)):
            text.update({f"encoder.layer.{i}.{part}.self.query.weight": (H, H),
                         f"encoder.layer.{i}.{part}.self.query.bias": (H,)})
            for name in ("key", "value"):
                text.update({f"encoder.layer.{i}.{part}.self.{name}.weight": (H, kv_width),
                             f"encoder.layer.{i}.{part}.self.{name}.bias": (H,)})
            text.update({f"encoder.layer.{i}.{part}.output.dense.weight": (H, H),
                         f"encoder.layer.{i}.{part}.output.dense.bias": (H,),
                         f"encoder.layer.{i}.{part}.output.LayerNorm.weight": (H,),
                         f"encoder.layer.{i}.{part}.output.LayerNorm.bias": (H,)})
        text.update({f"encoder.layer.{i}.intermediate.dense.weight": (TI, H),
                     f"encoder.layer.{i}.intermediate.dense.bias": (TI,),
                     f"encoder.layer.{i}.output.dense.weight": (H, TI), f"encoder.layer.{i}.output.dense.bias": (H,),
                     f"encoder.layer.{i}.output.LayerNorm.weight": (H,),
                     f"encoder.layer.{i}.output.LayerNorm.bias": (H,)})
    state.update({f"blip.text_encoder.{k}": v for k, v in text.items()})
    state.update({"blip.vision_proj.weight": (256, C), "blip.text_proj.weight": (256, H)})  # unused by the score
    for i, (o, k) in zip((0, 2, 4, 6, 7), ((1024, H), (128, 1024), (64, 128), (16, 64), (1, 16))):
        state.update({f"mlp.layers.{i}.weight": (o, k), f"mlp.layers.{i}.bias": (o,)})
    out = {}
    for k, shape in state.items():
        scale = 0.02 if k.endswith("embeddings.weight") else 0.1
        value = torch.randn(shape, generator=g) * scale
        out[k] = 1 + value if ("norm" in k.lower() and k.endswith("weight")) else value
    out["blip.text_encoder.embeddings.position_ids"] = torch.arange(64)[None]
    return out


# The official forward, copied from ImageReward 1.5 (pip `image-reward`; THUDM/ImageReward at tag v1.5):
# ImageReward/models/BLIP/vit.py VisionTransformer.forward, med.py BertModel.forward (mode "multimodal",
# BertSelfAttention, BertLayer) and ImageReward/ImageReward.py `score_gard`, written over the state dict,
# in eval mode (dropouts off).
def official_vit(sd, x):
    p = lambda k: sd["blip.visual_encoder." + k]  # noqa: E731
    C, heads, patch = VISION["hidden_size"], VISION["num_attention_heads"], VISION["patch_size"]
    B = x.shape[0]
    x = F.conv2d(x, p("patch_embed.proj.weight"), p("patch_embed.proj.bias"), stride=patch).flatten(2).transpose(1, 2)
    x = torch.cat((p("cls_token").expand(B, -1, -1), x), dim=1)
    x = x + p("pos_embed")[:, : x.size(1), :]
    N = x.shape[1]
    for i in range(VISION["num_hidden_layers"]):
        b = f"blocks.{i}."
        h = F.layer_norm(x, (C,), p(b + "norm1.weight"), p(b + "norm1.bias"), 1e-6)
        qkv = F.linear(h, p(b + "attn.qkv.weight"), p(b + "attn.qkv.bias"))
        q, k, v = qkv.reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(dim=-1)
        h = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = x + F.linear(h, p(b + "attn.proj.weight"), p(b + "attn.proj.bias"))
        h = F.layer_norm(x, (C,), p(b + "norm2.weight"), p(b + "norm2.bias"), 1e-6)
        h = F.linear(F.gelu(F.linear(h, p(b + "mlp.fc1.weight"), p(b + "mlp.fc1.bias"))), p(b + "mlp.fc2.weight"),
                     p(b + "mlp.fc2.bias"))
        x = x + h
    return F.layer_norm(x, (C,), p("norm.weight"), p("norm.bias"), 1e-6)


def official_text(sd, input_ids, attention_mask, image_embeds):
    p = lambda k: sd["blip.text_encoder." + k]  # noqa: E731
    H, heads = TEXT["hidden_size"], TEXT["num_attention_heads"]
    ln = lambda x, k: F.layer_norm(x, (H,), p(k + ".weight"), p(k + ".bias"), 1e-12)  # noqa: E731
    lin = lambda x, k: F.linear(x, p(k + ".weight"), p(k + ".bias"))  # noqa: E731
    L = input_ids.shape[1]
    x = ln(F.embedding(input_ids, p("embeddings.word_embeddings.weight"))
           + p("embeddings.position_embeddings.weight")[:L], "embeddings.LayerNorm")
    self_mask = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
    cross_mask = (1.0 - torch.ones(image_embeds.shape[:2])[:, None, None, :]) * -10000.0

    def attention(hidden, context, mask, prefix):
        split = lambda t: t.view(t.shape[0], t.shape[1], heads, H // heads).permute(0, 2, 1, 3)  # noqa: E731
        q, k, v = split(lin(hidden, prefix + ".self.query")), split(lin(context, prefix + ".self.key")), split(
            lin(context, prefix + ".self.value"))
        scores = (q @ k.transpose(-1, -2)) / (H // heads) ** 0.5 + mask
        ctx = (scores.softmax(dim=-1) @ v).permute(0, 2, 1, 3).reshape(hidden.shape)
        return ln(lin(ctx, prefix + ".output.dense") + hidden, prefix + ".output.LayerNorm")

    for i in range(TEXT["num_hidden_layers"]):
        b = f"encoder.layer.{i}"
        x = attention(x, x, self_mask, b + ".attention")
        x = attention(x, image_embeds, cross_mask, b + ".crossattention")
        x = ln(lin(F.gelu(lin(x, b + ".intermediate.dense")), b + ".output.dense") + x, b + ".output.LayerNorm")
    return x


def official_score_gard(sd, prompt_ids, prompt_attention_mask, image):
    text = official_text(sd, prompt_ids, prompt_attention_mask, official_vit(sd, image))
    rewards = text[:, 0, :]
    for i in (0, 2, 4, 6, 7):  # MLP: linear layers only (the dropouts between them are off in eval)
        rewards = F.linear(rewards, sd[f"mlp.layers.{i}.weight"], sd[f"mlp.layers.{i}.bias"])
    return ((rewards - 0.16717362830052426) / 1.0333394966054072).squeeze(-1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    state = official_state_dict()
    path = tmp_path_factory.mktemp("imagereward") / "ImageReward.pt"
    torch.save(state, path)
    return str(path), state


def _cfg(**overrides):
    cfg = config().reward.imagereward
    cfg.update(overrides)
    return cfg


@pytest.mark.parametrize("shape", [(48, 67), (67, 48), (512, 703)])
def test_equals_the_official_forward_on_its_preprocessing(checkpoint, shape):
    """Same weights (loaded through the real path), the official transform's pixels from uint8: same score.

    Measured (scores ~ -1.1): on the same pixels within 1e-5; from the images, 3.1e-4-5.8e-4 (the official PIL
    preprocessing's uint8 rounding), 0.018-0.030 with the former bilinear preprocessing.
    """
    path, state = checkpoint
    scorer = imagereward.build_scorer(_cfg(path=path))
    tokens = scorer.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    arrays = [ref.photo(name, *shape) for name in ("astronaut", "coffee")]
    pixels = torch.cat([ref.torchvision_clip(a, 32) for a in arrays])
    with torch.no_grad():
        expected = official_score_gard(state, tokens.input_ids, tokens.attention_mask, pixels)
        ours = scorer(torch.cat([ref.as_tensor(a) for a in arrays]), PROMPTS)
        # On the very same pixels: the architecture alone.
        torch.testing.assert_close(scorer.mlp(scorer.text(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, is_decoder=False,
            encoder_hidden_states=scorer.vision(pixel_values=pixels).last_hidden_state).last_hidden_state[:, 0]
        ).squeeze(-1).sub(imagereward.SCORE_MEAN).div(imagereward.SCORE_STD), expected, rtol=0, atol=1e-5)
    assert expected.std() > 0.01  # the two prompts/images score differently: the test can tell
    torch.testing.assert_close(ours, expected, rtol=0, atol=2e-3)


def test_tiny_reward_shape_dtype_and_gradient():
    images = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(0)).requires_grad_()
    rewards, components, info = make_reward("imagereward")(images, PROMPTS, [{}, {}])
    assert rewards.shape == (2,) and rewards.dtype == torch.float32 and torch.isfinite(rewards).all()
    rewards.sum().backward()
    assert images.grad.abs().sum() > 0


def test_wrong_or_broken_checkpoint_is_a_clear_error(checkpoint, tmp_path):
    path, state = checkpoint
    bad = dict(state)
    bad.pop("blip.visual_encoder.pos_embed")
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(BadWeightsError, match=r"does not fit ImageReward's image tower.*position_embedding"):
        imagereward.build_scorer(_cfg(path=str(tmp_path / "bad.pt")))
    (tmp_path / "cut.pt").write_bytes(open(path, "rb").read()[:1000])
    with pytest.raises(BadWeightsError, match=r"could not be read: the file is corrupt, truncated"):
        imagereward.build_scorer(_cfg(path=str(tmp_path / "cut.pt")))
    with pytest.raises(WeightsNotFoundError, match=r"do not exist. Point config.reward.imagereward.path"):
        imagereward.build_scorer(_cfg(path=str(tmp_path / "missing.pt")))


def test_offline_error_names_repo_file_and_key(offline):
    cfg = config("config/align_prop.py:aesthetic").reward.imagereward
    with pytest.raises(WeightsNotFoundError) as e:
        imagereward.build_scorer(cfg)
    message = str(e.value)
    assert "'THUDM/ImageReward'" in message and "'ImageReward.pt'" in message
    assert "config.reward.imagereward.path" in message


def test_unknown_architecture_is_a_start_up_problem():
    (problem,) = imagereward.problems(_cfg(model="blip-base"), "config.reward.imagereward")
    assert "config.reward.imagereward.model='blip-base': must be 'ImageReward-v1.0'" in problem
