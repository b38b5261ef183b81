"""HPSv3 (Ma et al. 2025, arXiv 2508.03789, MizzenAI/HPSv3): Qwen2-VL-7B-Instruct + an MLP reward head.

As the official `hpsv3/inference.py` (`HPSv3RewardInferencer.reward`) and `hpsv3/model/qwen2vl_trainer.py`
(`Qwen2VLRewardModelBT.forward`) compute it: one user message of the Qwen2-VL chat template holds the image,
then `INSTRUCTION` with the prompt and `RATING`, which ends in the special token `<|Reward|>` (added to the
tokenizer); the image is resized as `qwen_vl_utils.fetch_image` (PIL bicubic to `smart_resize` at exactly
256 x 28 x 28 pixels) and patched as Qwen2VLImageProcessor (14 px, temporal patch 2, 2x2 merge). The vision
tower's merged tokens replace the `<|image_pad|>` embeddings, the decoder runs with plain 1D positions 0..L-1
(the official forward passes `inputs_embeds` and no `position_ids`, so transformers 4.45 gives every token,
image tokens included, the same sequential position in all three M-RoPE sections), and the head
(`rm_head`: hidden -> 1024 -> ReLU -> 16 -> ReLU -> 2, fp32, dropout off) reads the final-norm hidden state
at `<|Reward|>`. Its outputs are (mu, sigma) of the uncertainty loss; the score is mu (the README's model means:
SD2 -0.2, SDXL 8.2, Flux-dev 10.4, Kolors 10.6; higher is better), sigma is logged as `hpsv3/sigma`.

Weights: `HPSv3.safetensors` of hub repo MizzenAI/HPSv3 (about 16 GB: 8.3B parameters in bf16; its `lm_head`
is not read, 7.7B are loaded) or `config.reward.hpsv3.path`; config, tokenizer and normalization of `backbone`
(Qwen/Qwen2-VL-7B-Instruct). `model="tiny"` builds a tiny Qwen2-VL with seeded random weights and an
in-process byte-level BPE tokenizer.
"""

import math
import os

import torch
from torch import nn

from alignprop.rewards import Reward
from alignprop.rewards.loading import BadWeightsError, WeightsNotFoundError, hub_file, load_pretrained
from alignprop.rewards.preprocess import CLIP_MEAN, CLIP_STD, normalize, resize
from alignprop.rng import seeded
from alignprop.speed import prepare_scorer

TINY = "tiny"
ARCHITECTURE = "HPSv3"
REWARD_TOKEN = "<|Reward|>"
IMAGE_PAD = "<|image_pad|>"
# Qwen2-VL's special tokens the chat template uses (pad first: the tokenizer's pad token).
QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", IMAGE_PAD,
                "<|video_pad|>")
# Official hpsv3/dataset/data_collator_qwen.py `INSTRUCTION` and `prompt_with_special_token`, character for
# character (trailing spaces included; tests check the SHA-256 of the official text).
INSTRUCTION = (
    "\nYou are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a "
    "overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst "
    "and 10 being the best. \n\n"
    "**Visual Quality:**  \n"
    "Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:\n"
    "- **Reasonableness:** The image should not contain any significant biological or logical errors, such as "
    "abnormal body structures or nonsensical environmental setups.\n"
    "- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to "
    "interpret, with no blurring or indistinct areas.\n"
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual "
    "elements (e.g., hair, clothing, shadows).\n"
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, "
    "composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of "
    "harmony and balance.\n"
    "- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or "
    "adult material. If such content is present, the image quality and satisfaction score should be the lowest "
    "possible. \n\n"
    "**Text Alignment:**  \n"
    "Assess how well the image matches the textual prompt across the following sub-dimensions:\n"
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) "
    "align with the textual description. The subject should match the description in terms of number, "
    "appearance, and behavior.\n"
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well "
    "the image adheres to this style.\n"
    "- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image "
    "logically fit the scenario described in the prompt. The environment should support and enhance the subject "
    "without contradictions.\n"
    "- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, "
    "accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be "
    "acceptable, but critical attributes should be preserved.\n"
    "- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the "
    "image. The generated content should not introduce elements that conflict with or distort the original "
    "description.\n"
    "Textual prompt - {text_prompt}\n\n\n"
)
RATING = f"\nPlease provide the overall ratings of this image: {REWARD_TOKEN}\n\nEND\n"
# Qwen2-VL-7B-Instruct's chat template for [system default, user (image, text)], add_generation_prompt=True.
CHAT_PREFIX = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
CHAT_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
PIXELS = 256 * 28 * 28  # the official min_pixels = max_pixels (inference.py, HPSv3_7B.yaml)
MAX_RATIO = 200  # qwen_vl_utils' limit on the aspect ratio
HEAD = (1024, 16, 2)  # rm_head's widths (rm_head_type "ranknet", no rm_head_kwargs; output_dim 2: mu, sigma)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rms_norm_eps=1e-6,
                 rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 1, 1]))
TINY_VISION = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2)


def smart_resize(height, width, factor, min_pixels, max_pixels):
    """qwen_vl_utils' `smart_resize`: (h, w) multiples of `factor`, close to the aspect ratio, pixels in range."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"HPSv3: an image of {height}x{width} has an aspect ratio over {MAX_RATIO}")
    h_bar, w_bar = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar, w_bar = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify(pixels, patch, temporal, merge):
    """[B,C,H,W] -> ([B*gh*gw, C*temporal*patch*patch], gh, gw) in Qwen2VLImageProcessor's order: each image
    repeated `temporal` times, patches grouped by merge window (row-major windows, row-major inside)."""
    b, c, h, w = pixels.shape
    gh, gw = h // patch, w // patch
    x = pixels[:, None].expand(b, temporal, c, h, w)
    x = x.reshape(b, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(b * gh * gw, c * temporal * patch * patch), gh, gw


def reward_head(hidden_size):
    """The official `rm_head` (state-dict indices 0, 3, 5; dropout at 2 is off in eval)."""
    return nn.Sequential(nn.Linear(hidden_size, HEAD[0]), nn.ReLU(), nn.Dropout(0.05), nn.Linear(*HEAD[:2]),
                         nn.ReLU(), nn.Linear(*HEAD[1:]))


class HPSv3Scorer(nn.Module):
    """(images [B,3,H,W] in [0, 1], prompts) -> (mu, sigma) [B] each. Frozen, differentiable w.r.t. the images."""

    def __init__(self, model, head, tokenizer, min_pixels=PIXELS, max_pixels=PIXELS, mean=CLIP_MEAN, std=CLIP_STD):
        super().__init__()
        self.model, self.head, self.tokenizer = model, head, tokenizer
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.mean, self.std = tuple(mean), tuple(std)
        vision = model.config.vision_config
        self.patch, self.temporal, self.merge = vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size
        self.reward_id = tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        if tokenizer.convert_tokens_to_ids(IMAGE_PAD) != model.config.image_token_id:
            raise BadWeightsError(f"HPSv3: the tokenizer's {IMAGE_PAD} id {tokenizer.convert_tokens_to_ids(IMAGE_PAD)}"
                                  f" is not the model's image_token_id {model.config.image_token_id}")
        self.requires_grad_(False)
        self.eval()

    def pixel_values(self, images):
        """[B,3,H,W] in [0, 1] -> patches [B*gh*gw, 3*2*14*14] and (gh, gw), as fetch_image + the image processor."""
        size = smart_resize(*images.shape[-2:], self.patch * self.merge, self.min_pixels, self.max_pixels)
        return patchify(normalize(resize(images, size), self.mean, self.std), self.patch, self.temporal, self.merge)

    def texts(self, prompts, image_tokens):
        pads = IMAGE_PAD * image_tokens
        return [f"{CHAT_PREFIX}{pads}<|vision_end|>{INSTRUCTION.format(text_prompt=p)}{RATING}{CHAT_SUFFIX}"
                for p in prompts]

    def forward(self, images, prompts):
        param = next(self.model.parameters())
        patches, gh, gw = self.pixel_values(images.to(param.dtype))
        grid = torch.tensor([[1, gh, gw]] * images.shape[0], device=param.device)
        image_embeds = self.model.visual(patches, grid_thw=grid).pooler_output  # [B * gh*gw/4, D]
        tokens = self.tokenizer(self.texts(prompts, gh * gw // self.merge**2), padding=True, padding_side="right",
                                return_tensors="pt").to(param.device)
        ids = tokens.input_ids
        embeds = self.model.language_model.embed_tokens(ids)
        image_mask = (ids == self.model.config.image_token_id)[..., None].expand_as(embeds)
        embeds = embeds.masked_scatter(image_mask, image_embeds.to(embeds.dtype))
        positions = torch.arange(ids.shape[1], device=ids.device).expand(3, *ids.shape)  # see the docstring
        hidden = self.model.language_model(inputs_embeds=embeds, attention_mask=tokens.attention_mask,
                                           position_ids=positions, use_cache=False).last_hidden_state
        is_reward = ids == self.reward_id
        if not (is_reward.sum(1) == 1).all():
            raise ValueError(f"HPSv3: every prompt must give exactly one {REWARD_TOKEN} token; a prompt contains it")
        out = self.head(hidden[is_reward].float())  # rm_head runs in fp32, as the official autocast does
        return out[:, 0], out[:, 1]


def read_checkpoint(path, key):
    """The tensors of an HPSv3 checkpoint (.safetensors or a torch state dict, optionally under "model"), without
    `lm_head` (the reward never uses it)."""
    if not os.path.exists(path):
        raise WeightsNotFoundError(f"HPSv3 checkpoint {path!r} does not exist. Point {key} at HPSv3.safetensors "
                                   f"(hub repo MizzenAI/HPSv3).")
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:  # one tensor at a time: no second copy of 16 GB
                return {k: f.get_tensor(k) for k in f.keys() if not k.startswith("lm_head.")}
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # safetensors, zip and pickle errors of a corrupt or truncated file
        raise BadWeightsError(f"HPSv3 checkpoint {path!r} ({os.path.getsize(path)} bytes) could not be read: corrupt, "
                              f"truncated or not a checkpoint ({' '.join(str(e).split())[:200]}). Point {key} at a "
                              f"good copy of HPSv3.safetensors.") from e
    state = state.get("model", state)
    return {k: v for k, v in state.items() if not k.startswith("lm_head.")}


# Checkpoint names -> Qwen2VLModel's. The official code saved transformers 4.45's layout (`visual.*`, the decoder
# as `model.*`); transformers >= 4.52 names them `model.visual.*`, `model.language_model.*`. Both are read.
RENAMES = (("model.visual.", "visual."), ("model.language_model.", "language_model."), ("visual.", "visual."),
           ("model.", "language_model."))


def split_state(state):
    """(backbone, head) state dicts of a checkpoint; names of neither layout are kept for load_state_dict to report."""
    model, head = {}, {}
    for k, v in state.items():
        if k.startswith("rm_head."):
            head[k.removeprefix("rm_head.")] = v
            continue
        old, new = next(((o, n) for o, n in RENAMES if k.startswith(o)), ("", ""))
        model[new + k.removeprefix(old)] = v
    return model, head


def load_weights(model, head, state, path, key):
    """Load `state` into (model, head) strictly, assigning the file's tensors (no copy, no fp32 upcast)."""
    for module, part, name in zip((model, head), split_state(state), ("Qwen2-VL backbone", "reward head")):
        try:
            module.load_state_dict(part, strict=True, assign=True)
        except RuntimeError as e:
            raise BadWeightsError(f"{key}={path!r} does not fit HPSv3's {name} (is it HPSv3.safetensors?): "
                                  f"{' '.join(str(e).split())[:400]}") from e


def init_buffers(model):
    """Rebuild the rotary embeddings, whose non-persistent buffers (inv_freq) stay on the meta device when the
    model is built there and its weights assigned from a file."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, type(module)(module.config))


def tiny_tokenizer():
    from alignprop.tokenizers import tiny_byte_bpe_tokenizer

    corpus = [CHAT_PREFIX + CHAT_SUFFIX, INSTRUCTION, RATING, "a photo of a cat dog owl horse in the garden"]
    tokenizer = tiny_byte_bpe_tokenizer(corpus, QWEN_SPECIAL, vocab_size=1500, pad_token=QWEN_SPECIAL[0])
    tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})  # as the official adds it
    return tokenizer


def tiny_config(tokenizer):
    from transformers import Qwen2VLConfig

    ids = dict(zip(("pad", "start", "end", "vstart", "vend", "image", "video"),
                   tokenizer.convert_tokens_to_ids(list(QWEN_SPECIAL))))
    text = dict(TINY_TEXT, vocab_size=len(tokenizer), bos_token_id=ids["pad"], eos_token_id=ids["end"])
    return Qwen2VLConfig(text_config=text, vision_config=TINY_VISION, image_token_id=ids["image"],
                         video_token_id=ids["video"], vision_start_token_id=ids["vstart"],
                         vision_end_token_id=ids["vend"])


def build_scorer(cfg, seed=0, device=None):
    """The scorer of `config.reward.hpsv3`: 'tiny' (seeded random, or `path` loaded into it) or the official one."""
    from transformers import Qwen2VLModel

    key = "config.reward.hpsv3.path"
    pixels = dict(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    if cfg.model == TINY:
        tokenizer = tiny_tokenizer()
        with seeded(seed):
            model, head = Qwen2VLModel(tiny_config(tokenizer)), reward_head(TINY_TEXT["hidden_size"])
        if cfg.path:
            load_weights(model, head, read_checkpoint(cfg.path, key), cfg.path, key)
        return HPSv3Scorer(model, head, tokenizer, **pixels)
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    path = cfg.path or hub_file(cfg.repo, cfg.file, key=key)
    state = read_checkpoint(path, key)
    backbone = "config.reward.hpsv3.backbone"
    config = load_pretrained(AutoConfig, cfg.backbone, key=backbone)
    tokenizer = load_pretrained(AutoTokenizer, cfg.backbone, key=backbone)
    tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    image_processor = load_pretrained(AutoImageProcessor, cfg.backbone, key=backbone)
    embed = split_state(state)[0].get("language_model.embed_tokens.weight")
    if embed is None or embed.shape[0] < len(tokenizer):
        raise BadWeightsError(f"{key}={path!r}: its token embedding ({None if embed is None else tuple(embed.shape)}) "
                              f"does not cover the tokenizer of {backbone}={cfg.backbone!r} with {REWARD_TOKEN} "
                              f"({len(tokenizer)} tokens): is it HPSv3.safetensors, and the backbone Qwen2-VL-7B?")
    config.text_config.vocab_size = embed.shape[0]  # the official resize_token_embeddings(len(tokenizer))
    with torch.device("meta"):  # 8B parameters: no random init, the file's tensors are assigned
        model, head = Qwen2VLModel(config), reward_head(config.text_config.hidden_size)
    load_weights(model, head, state, path, key)
    init_buffers(model)
    return HPSv3Scorer(model, head, tokenizer, mean=image_processor.image_mean, std=image_processor.image_std,
                       **pixels)


def build(cfg, seed=0, device=None, dtype=None):
    scorer = prepare_scorer(build_scorer(cfg, seed, device), device, dtype)
    scorer.head.float()  # the official head stays fp32 whatever the backbone's dtype

    def reward_fn(images, prompts, metadata):
        mu, sigma = scorer(images, prompts)
        return mu, {"sigma": sigma.detach()}

    return reward_fn


def problems(cfg, prefix):
    out = []
    if cfg.model not in (TINY, ARCHITECTURE):
        out.append(f"{prefix}.model={cfg.model!r}: must be {ARCHITECTURE!r} (Qwen2-VL-7B + the official reward head) "
                   f"or 'tiny' (a tiny random Qwen2-VL, offline)")
    for name in ("min_pixels", "max_pixels"):
        value = cfg[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 28 * 28:
            out.append(f"{prefix}.{name}={value!r}: must be a whole number of pixels >= 784 (one 28x28 token); the "
                       f"official value is {PIXELS} (256 x 28 x 28)")
    if not out and cfg.min_pixels > cfg.max_pixels:
        out.append(f"{prefix}.min_pixels={cfg.min_pixels!r} is above {prefix}.max_pixels={cfg.max_pixels!r}")
    return out


REWARDS = (
    Reward("hpsv3", "hpsv3", build, "HPSv3: Qwen2-VL-7B + MLP head on the <|Reward|> token, mu (model means "
           "about 0-11)", problems=problems),
)
