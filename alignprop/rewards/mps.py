"""MPS (Multi-dimensional Preference Score, Zhang et al. CVPR 2024, Kwai-Kolors/MPS), the "overall" model.

A CLIP ViT-H/14 (transformers `CLIPModel`, LAION's `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` fine-tuned) plus
a 4-layer cross model. As the official `trainer/models/clip_model.py` `CLIPModel.forward`: the projected
tokens of the prompt (77, padded, no attention mask, pooled at the argmax token: `eos_token_id = 2`) and of
a fixed condition text ("light, color, clarity, ...") give a mask of the prompt tokens similar to the
condition (max over condition tokens, divided by its maximum, > 0.01); the projected image tokens (257,
before the vision tower's final norm) attend to the masked prompt tokens through the cross model; the score
is `logit_scale.exp()` x the cosine of the first output token and the prompt's pooled embedding (about 10-15
for real images). The official code divides by the maximum over the whole batch; here over each prompt, as
its inference scores one prompt at a time (identical for a batch of one prompt). Images are preprocessed as
transformers' CLIPImageProcessor (bicubic, crop offset rounded down).

Weights: the official checkpoint `MPS_overall_checkpoint.pth` (a pickled model; only its tensors are read,
nothing of it is executed or imported) or a plain state dict, at `config.reward.mps.path`, or `repo`/`file`
from the hub; the tokenizer and image normalization come from `processor`. `model="tiny"` builds tiny towers.
"""

import os
import pickle
import types

import torch
from torch import nn

from alignprop.rewards import Reward, towers
from alignprop.rewards.loading import BadWeightsError, WeightsNotFoundError, hub_file, load_pretrained
from alignprop.rewards.preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess
from alignprop.rng import seeded
from alignprop.speed import prepare_scorer

TINY = "tiny"
ARCHITECTURE = "MPS-overall"
CONDITION = ("light, color, clarity, tone, style, ambiance, artistry, shape, face, hair, hands, limbs, structure, "
             "instance, texture, quantity, attributes, position, number, location, word, things.")
# laion/CLIP-ViT-H-14-laion2B-s32B-b79K's CLIPConfig (the published config.json), and MPS's cross model.
VIT_H14 = dict(text_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                                hidden_act="gelu"),
               vision_config=dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16,
                                  num_hidden_layers=32, patch_size=14, image_size=224, hidden_act="gelu"),
               projection_dim=1024)
CROSS = dict(dim=1024, layer_num=4, dim_head=64, heads=16, ff_mult=4)
TINY_CROSS = dict(dim=32, layer_num=2, dim_head=8, heads=4, ff_mult=4)


# The cross model: official trainer/models/cross_modeling.py (Kwai-Kolors/MPS), rewritten without einops; the
# parameter names are the official ones so that its checkpoint loads strictly.
class LayerNorm(nn.Module):
    """LayerNorm with a fixed zero bias (a buffer), as the official one."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_buffer("bias", torch.zeros(dim))

    def forward(self, x):
        return nn.functional.layer_norm(x, x.shape[-1:], self.weight, self.bias)


def _swiglu(x):
    x, gate = x.chunk(2, dim=-1)
    return nn.functional.silu(gate) * x


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class CrossAttention(nn.Module):
    """Image tokens attend to the masked prompt tokens (one shared key/value head), plus a parallel SwiGLU."""

    def __init__(self, dim, dim_head, heads, ff_mult):
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        self.norm = LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, dim_head * 2, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim * 2, bias=False), nn.Identity(),
                                nn.Linear(ff_mult * dim, dim, bias=False))

    def forward(self, x, context, mask):
        x = self.norm(x)
        b, n, _ = x.shape
        q = self.to_q(x).view(b, n, self.heads, -1).transpose(1, 2) * self.scale
        k, v = self.to_kv(context).chunk(2, dim=-1)
        sim = q @ k.transpose(-1, -2)[:, None] + mask[:, None].to(q.dtype)
        attn = (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1)
        out = self.to_out((attn @ v[:, None]).transpose(1, 2).reshape(b, n, -1))
        return out + self.ff[2](_swiglu(self.ff[0](x)))


class RotaryEmbedding(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))


class ParallelTransformerBlock(nn.Module):
    """PaLM-style block: rotary self-attention (one key/value head) and SwiGLU from one fused projection."""

    def __init__(self, dim, dim_head, heads, ff_mult):
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        self.norm = LayerNorm(dim)
        self.fused_dims = (heads * dim_head, dim_head, dim_head, dim * ff_mult * 2)
        self.rotary_emb = RotaryEmbedding(dim_head)
        self.fused_attn_ff_proj = nn.Linear(dim, sum(self.fused_dims), bias=False)
        self.attn_out = nn.Linear(heads * dim_head, dim, bias=False)
        self.ff_out = nn.Sequential(nn.Identity(), nn.Linear(dim * ff_mult, dim, bias=False))

    def forward(self, x):
        x = self.norm(x)
        b, n, _ = x.shape
        q, k, v, ff = self.fused_attn_ff_proj(x).split(self.fused_dims, dim=-1)
        q = q.view(b, n, self.heads, -1).transpose(1, 2)
        freqs = torch.arange(n, device=x.device, dtype=torch.float32)[:, None] * self.rotary_emb.inv_freq.float()
        positions = torch.cat((freqs, freqs), dim=-1).to(x.dtype)
        q, k = [t * positions.cos() + _rotate_half(t) * positions.sin() for t in (q, k)]
        sim = (q * self.scale) @ k.transpose(-1, -2)[:, None]
        attn = (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1)
        out = (attn @ v[:, None]).transpose(1, 2).reshape(b, n, -1)
        return self.attn_out(out) + self.ff_out[1](_swiglu(ff))


class Residual(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, *args):
        return self.fn(x, *args) + x


class CrossModel(nn.Module):
    def __init__(self, dim, layer_num, dim_head, heads, ff_mult):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([Residual(CrossAttention(dim, dim_head, heads, ff_mult)),
                           Residual(ParallelTransformerBlock(dim, dim_head, heads, ff_mult))])
            for _ in range(layer_num))

    def forward(self, query_tokens, context_tokens, mask):
        for cross_attn, self_attn_ff in self.layers:
            query_tokens = self_attn_ff(cross_attn(query_tokens, context_tokens, mask))
        return query_tokens


class MPSScorer(nn.Module):
    """(images [B,3,H,W] in [0, 1], prompts) -> MPS [B]. Frozen, differentiable w.r.t. the images."""

    def __init__(self, model, cross_model, tokenizer, mean=CLIP_MEAN, std=CLIP_STD):
        super().__init__()
        self.model, self.cross_model, self.tokenizer = model, cross_model, tokenizer
        self.model.text_model.eos_token_id = 2  # as the official code sets it: pool at the argmax token id
        self.mean, self.std = tuple(mean), tuple(std)
        self.image_size = model.config.vision_config.image_size
        self.max_length = model.config.text_config.max_position_embeddings
        self.requires_grad_(False)
        self.eval()

    def text_tokens(self, texts):
        """Projected token embeddings [B, L, D] and the pooled one [B, D] (input ids only, as the official)."""
        ids = self.tokenizer(list(texts), max_length=self.max_length, padding="max_length", truncation=True,
                             return_tensors="pt").input_ids.to(self.model.text_projection.weight.device)
        out = self.model.text_model(input_ids=ids)
        return self.model.text_projection(out.last_hidden_state), self.model.text_projection(out.pooler_output)

    def forward(self, images, prompts):
        param = next(self.parameters())
        pixels = clip_preprocess(images.to(param.dtype), self.image_size, self.mean, self.std)
        text_f, text_eos = self.text_tokens(prompts)
        condition_f, _ = self.text_tokens([CONDITION] * len(prompts))
        image_f = self.model.visual_projection(self.model.vision_model(pixel_values=pixels).last_hidden_state)
        similarity = (condition_f @ text_f.transpose(1, 2)).amax(dim=1, keepdim=True)  # [B, 1, L]
        similarity = similarity / similarity.amax(dim=(1, 2), keepdim=True)
        mask = torch.where(similarity > 0.01, 0.0, float("-inf")).expand(-1, image_f.shape[1], -1)
        image_token = self.cross_model(image_f, text_f, mask)[:, 0]
        cosine = nn.functional.cosine_similarity(image_token, text_eos, dim=-1)
        return self.model.logit_scale.exp() * cosine


# What the unpickler may call: torch's tensor rebuilders, torch.nn modules and plain containers; any other
# global (transformers' classes, MPS's own, and every callable that could run code) becomes an empty record.
SAFE_GLOBALS = {"collections": {"OrderedDict"}, "copyreg": {"_reconstructor"}, "_codecs": {"encode"},
                "builtins": {"set", "frozenset", "dict", "list", "tuple", "int", "float", "bool", "str", "bytes",
                             "slice", "object"},
                "torch._utils": {"_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state"},
                "torch.nn.parameter": {"Parameter"}, "torch": {"Size", "float32", "float16", "bfloat16", "int64"}}


class _Tensors(pickle.Unpickler):
    """Unpickles a whole saved model with every class outside torch.nn replaced by an empty record: its tensors
    can be read without the code (or the library versions) that saved it, and nothing of it runs."""

    def find_class(self, module, name):
        module = "builtins" if module == "__builtin__" else module
        if name in SAFE_GLOBALS.get(module, ()) or module.startswith("torch.nn.modules."):
            return super().find_class(module, name)
        return type(name, (), {"__init__": lambda self, *a, **k: None, "__setstate__": _record})


def _record(self, state):
    self.__dict__.update(state if isinstance(state, dict) else {})


def _collect(obj, prefix, out):
    """The persistent tensors of a (possibly unpickled-as-record) module tree, by state-dict name."""
    fields = vars(obj) if hasattr(obj, "__dict__") else {}
    skip = fields.get("_non_persistent_buffers_set", set())
    for kind in ("_parameters", "_buffers"):
        for name, tensor in (fields.get(kind) or {}).items():
            if tensor is not None and name not in skip:
                out[prefix + name] = tensor
    for name, child in (fields.get("_modules") or {}).items():
        if child is not None:
            _collect(child, f"{prefix}{name}.", out)
    return out


def read_checkpoint(path, key):
    """The state dict of an MPS checkpoint: the official pickled model or a state dict (.pth or .safetensors)."""
    if not os.path.exists(path):
        raise WeightsNotFoundError(f"MPS checkpoint {path!r} does not exist. Point {key} at "
                                   f"MPS_overall_checkpoint.pth.")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        loaded = torch.load(path, map_location="cpu", weights_only=False,
                            pickle_module=types.SimpleNamespace(Unpickler=_Tensors, load=None, __name__="pickle"))
    except Exception as e:  # zip, pickle and safetensors errors of a corrupt or truncated file
        raise BadWeightsError(f"MPS checkpoint {path!r} ({os.path.getsize(path)} bytes) could not be read: corrupt, "
                              f"truncated or not a checkpoint ({' '.join(str(e).split())[:200]}). Point {key} at a "
                              f"good copy of MPS_overall_checkpoint.pth.") from e
    if isinstance(loaded, dict):
        return dict(loaded.get("state_dict", loaded))
    return _collect(loaded, "", {})


def load_weights(model, cross_model, state, path, key):
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}  # transformers 4's buffers
    parts = ({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")},
             {k.removeprefix("cross_model."): v for k, v in state.items() if k.startswith("cross_model.")})
    for module, part, name in zip((model, cross_model), parts, ("CLIP", "cross model")):
        try:
            module.load_state_dict(part, strict=True)
        except RuntimeError as e:
            raise BadWeightsError(f"{key}={path!r} does not fit MPS's {name} (is it MPS_overall_checkpoint.pth?): "
                                  f"{' '.join(str(e).split())[:400]}") from e


def build_scorer(cfg, seed=0, device=None):
    key = "config.reward.mps.path"
    if cfg.model == TINY:
        from alignprop.tokenizers import clip_tokenizer

        with seeded(seed):
            model, cross_model = towers.tiny_clip(seed), CrossModel(**TINY_CROSS)
        if cfg.path:
            load_weights(model, cross_model, read_checkpoint(cfg.path, key), cfg.path, key)
        return MPSScorer(model, cross_model, clip_tokenizer())
    from transformers import AutoProcessor, CLIPConfig, CLIPModel

    if not (cfg.path or cfg.repo):
        raise WeightsNotFoundError(
            f"{key} is unset and so is config.reward.mps.repo: MPS's official checkpoint (MPS_overall_checkpoint.pth) "
            f"is published through the Kwai-Kolors/MPS README (not on the hub); download it and set {key} to it, or "
            f"set config.reward.mps.repo/file to a hub copy.")
    path = cfg.path or hub_file(cfg.repo, cfg.file, key=key)
    state = read_checkpoint(path, key)
    processor = load_pretrained(AutoProcessor, cfg.processor, key="config.reward.mps.processor")
    with torch.device("meta"):
        model, cross_model = CLIPModel(CLIPConfig(**VIT_H14)), CrossModel(**CROSS)
    model, cross_model = model.to_empty(device="cpu"), cross_model.to_empty(device="cpu")
    load_weights(model, cross_model, state, path, key)
    image_processor = processor.image_processor
    return MPSScorer(model, cross_model, processor.tokenizer, image_processor.image_mean, image_processor.image_std)


def build(cfg, seed=0, device=None, dtype=None):
    scorer = prepare_scorer(build_scorer(cfg, seed, device), device, dtype)

    def reward_fn(images, prompts, metadata):
        return scorer(images, prompts).float(), {}

    return reward_fn


def problems(cfg, prefix):
    if cfg.model not in (TINY, ARCHITECTURE):
        return [f"{prefix}.model={cfg.model!r}: must be {ARCHITECTURE!r} (CLIP ViT-H/14 + MPS's cross model) or 'tiny'"]
    return []


REWARDS = (
    Reward("mps", "mps", build, "MPS overall: CLIP ViT-H/14 + condition-masked cross model, logit scale x cosine "
           "(about 10-15)", problems=problems),
)
