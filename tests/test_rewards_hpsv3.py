"""HPSv3: our scorer == an independent copy of the official forward (MizzenAI/HPSv3) with the same weights.

The reference follows the official inference path (commit 77e8fa3): `hpsv3/inference.py` builds one user
message per image (image, then INSTRUCTION + prompt_with_special_token), `hpsv3/dataset/utils.py`
`fetch_image` resizes the PIL image (smart_resize at 256 x 28 x 28, PIL bicubic), the Qwen2-VL processor
renders the chat template, expands `<|image_pad|>` and patches the image, and
`hpsv3/model/qwen2vl_trainer.py` `Qwen2VLRewardModelBT.forward` runs the model and reads `rm_head` at
`<|Reward|>`. The towers are transformers' Qwen2-VL modules, as the official class subclasses them.
"""

import hashlib
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import reference_preprocess as ref
from alignprop import rewards
from alignprop.rewards import hpsv3
from alignprop.rewards.loading import BadWeightsError, WeightsNotFoundError
from helpers import config, make_reward

PROMPTS = ["a photo of a cat on a sofa", "an oil painting of a lighthouse at night"]
# SHA-256 of `INSTRUCTION` and `prompt_with_special_token` of the official hpsv3/dataset/data_collator_qwen.py.
INSTRUCTION_SHA256 = "0393599dad45a971903d1d62a3acf9bad3ccccdafa7f40f680523419e1f68b7a"
RATING_SHA256 = "2471faca094ae5bd6fe17b71dce20c3d7583625545e235889f7e74e7eeb69d0a"
# Qwen/Qwen2-VL-7B-Instruct's chat_template.json.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


def _cfg(**overrides):
    cfg = config().reward.hpsv3
    cfg.update(overrides)
    return cfg


def official_head(hidden):
    """`rm_head` of Qwen2VLRewardModelBT with rm_head_type="ranknet", no rm_head_kwargs, output_dim=2."""
    return nn.Sequential(nn.Linear(hidden, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(),
                         nn.Linear(16, 2))


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """A tiny reward model laid out as the official one, saved as the official checkpoint is (transformers 4.45
    names: `visual.*`, `model.*`, `lm_head.*`, `rm_head.*`); weights spread wider than the init so that the
    scores of different images differ clearly."""
    from safetensors.torch import save_file
    from transformers import Qwen2VLForConditionalGeneration

    tokenizer = hpsv3.tiny_tokenizer()
    torch.manual_seed(3)
    model, head = Qwen2VLForConditionalGeneration(hpsv3.tiny_config(tokenizer)).eval(), official_head(32).eval()
    with torch.no_grad():
        for p in [*model.parameters(), *head.parameters()]:
            p.add_(torch.randn_like(p) * 0.1)
    renames = (("model.visual.", "visual."), ("model.language_model.", "model."), ("lm_head.", "lm_head."))
    state = {new + k.removeprefix(old): v for k, v in model.state_dict().items()
             for old, new in renames if k.startswith(old)}
    assert len(state) == len(model.state_dict())
    state.update({f"rm_head.{k}": v for k, v in head.state_dict().items()})
    path = tmp_path_factory.mktemp("hpsv3") / "HPSv3.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return str(path), model, head, tokenizer, state


def official_smart_resize(height, width, factor, min_pixels, max_pixels):
    """hpsv3/dataset/utils.py `smart_resize` (qwen_vl_utils)."""
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar, w_bar = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def official_batch(tokenizer, arrays, prompts, pixels):
    """`HPSv3RewardInferencer.prepare_batch`: messages, fetch_image, the processor (Qwen2-VL-7B-Instruct's settings)."""
    from transformers import Qwen2VLProcessor, Qwen2VLVideoProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer.padding_side = "right"  # AutoProcessor.from_pretrained(..., padding_side="right")
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056),
                                 tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(),
                                 chat_template=CHAT_TEMPLATE)
    images = []
    for array in arrays:  # fetch_image, PIL branch
        image = Image.fromarray(array).convert("RGB")
        height, width = official_smart_resize(image.height, image.width, 28, pixels, pixels)
        images.append(image.resize((width, height), Image.BICUBIC))
    messages = [[{"role": "user", "content": [
        {"type": "image", "image": image, "min_pixels": pixels, "max_pixels": pixels},
        {"type": "text", "text": hpsv3.INSTRUCTION.format(text_prompt=text) + hpsv3.RATING}]}]
        for text, image in zip(prompts, images)]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor(text=text, images=images, padding=True, return_tensors="pt")


def official_forward(model, head, batch, reward_id):
    """`Qwen2VLRewardModelBT.forward` (reward_token="special") -> logits [B, 2] = (mu, sigma)."""
    ids = batch["input_ids"]
    inputs_embeds = model.model.language_model.embed_tokens(ids)
    image_embeds = model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
    image_mask = (ids == model.config.image_token_id).unsqueeze(-1).expand_as(inputs_embeds)
    inputs_embeds = inputs_embeds.masked_scatter(image_mask, image_embeds)
    # The official call passes no position_ids; transformers 4.45's decoder then uses arange(L) (cache_position).
    hidden = model.model.language_model(inputs_embeds=inputs_embeds, attention_mask=batch["attention_mask"],
                                        use_cache=False).last_hidden_state
    logits = head(hidden)
    return logits[ids == reward_id].view(ids.shape[0], -1)


def test_instruction_and_rating_are_the_official_text():
    assert hashlib.sha256(hpsv3.INSTRUCTION.encode()).hexdigest() == INSTRUCTION_SHA256
    assert hashlib.sha256(hpsv3.RATING.encode()).hexdigest() == RATING_SHA256


@pytest.mark.parametrize("shape, pixels", [((512, 703), hpsv3.PIXELS), ((67, 48), hpsv3.PIXELS), ((64, 64), 3136)])
def test_equals_the_official_forward(official, shape, pixels, monkeypatch):
    """Official checkpoint layout loaded by path; tokens, patches and scores against the official pipeline.

    (512, 703): downscaled to 364x504 (234 image tokens); (67, 48): upscaled to 532x392; (64, 64): the tiny
    config's 56x56. Measured: ids identical; patches within 0.0164 (1.09 uint8 levels: the official path resizes
    to uint8 with PIL, we keep floats), tolerance 0.02; mu from the images within 1.1e-3 (that rounding),
    tolerance 2e-3, while the two images' mu differ by 0.05-0.21; (mu, sigma) on the official patches within
    7e-7 (float summation order), tolerance 2e-6.
    """
    path, model, head, tokenizer, state = official
    scorer = hpsv3.build_scorer(_cfg(path=path, min_pixels=pixels, max_pixels=pixels))
    arrays = [ref.photo(name, *shape) for name in ("astronaut", "coffee")]
    batch = official_batch(tokenizer, arrays, PROMPTS, pixels)
    images = torch.cat([ref.as_tensor(a) for a in arrays])
    patches, gh, gw = scorer.pixel_values(images)
    assert batch["image_grid_thw"].tolist() == [[1, gh, gw]] * 2
    ours_ids = scorer.tokenizer(scorer.texts(PROMPTS, gh * gw // 4), padding=True, return_tensors="pt").input_ids
    assert torch.equal(ours_ids, batch["input_ids"])
    torch.testing.assert_close(patches, batch["pixel_values"], rtol=0, atol=0.02)
    with torch.no_grad():
        expected = official_forward(model, head, batch, tokenizer.convert_tokens_to_ids("<|Reward|>"))
        mu, sigma = scorer(images, PROMPTS)
        assert (expected[0, 0] - expected[1, 0]).abs() > 0.02  # two images score differently: the test can tell
        torch.testing.assert_close(mu, expected[:, 0], rtol=0, atol=2e-3)
        monkeypatch.setattr(scorer, "pixel_values", lambda images: (batch["pixel_values"], gh, gw))
        mu, sigma = scorer(images, PROMPTS)  # the architecture alone
    torch.testing.assert_close(torch.stack([mu, sigma], 1), expected, rtol=0, atol=2e-6)


def test_meta_build_assigns_the_file_and_rebuilds_buffers(official):
    """The full-size path: built on the meta device, the file's tensors assigned, the rotary buffers rebuilt."""
    from transformers import Qwen2VLModel

    path, model, head, tokenizer, state = official
    with torch.device("meta"):
        backbone, ours_head = Qwen2VLModel(hpsv3.tiny_config(tokenizer)), hpsv3.reward_head(32)
    hpsv3.load_weights(backbone, ours_head, hpsv3.read_checkpoint(path, "key"), path, "key")
    hpsv3.init_buffers(backbone)
    assert not any(t.is_meta for t in [*backbone.parameters(), *backbone.buffers(), *ours_head.parameters()])
    scorer = hpsv3.HPSv3Scorer(backbone, ours_head, tokenizer, min_pixels=3136, max_pixels=3136)
    reference = hpsv3.build_scorer(_cfg(path=path, min_pixels=3136, max_pixels=3136))
    images = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(scorer(images, PROMPTS), reference(images, PROMPTS), rtol=0, atol=0)


def test_tiny_reward_shape_dtype_and_gradient():
    images = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(0)).requires_grad_()
    total, components, info = make_reward("hpsv3")(images, PROMPTS, [{}, {}])
    assert total.shape == (2,) and total.dtype == torch.float32 and torch.isfinite(total).all()
    assert info["hpsv3/sigma"].shape == (2,)
    total.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert (images.grad.abs().flatten(1).sum(1) > 0).all()  # every image gets its own gradient


def test_smart_resize_matches_the_official_formula():
    for height, width in [(512, 512), (512, 703), (703, 512), (48, 67), (1024, 1024), (768, 1344), (30, 30)]:
        for pixels in (hpsv3.PIXELS, 3136, 12845056):
            expected = official_smart_resize(height, width, 28, pixels, pixels)
            assert hpsv3.smart_resize(height, width, 28, pixels, pixels) == expected
    assert hpsv3.smart_resize(512, 512, 28, hpsv3.PIXELS, hpsv3.PIXELS) == (448, 448)


def test_checkpoint_errors(official, tmp_path):
    path, model, head, _, state = official
    torch.save({"model": state}, tmp_path / "state.pth")  # a torch state dict under "model", as the official reads
    # transformers >= 4.52's names (model.visual.*, model.language_model.*) load the same model.
    new_names = {**model.state_dict(), **{f"rm_head.{k}": v for k, v in head.state_dict().items()}}
    torch.save(new_names, tmp_path / "new_names.pt")
    images = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        scores = [hpsv3.build_scorer(_cfg(path=p))(images, PROMPTS)[0] for p in (path, str(tmp_path / "state.pth"),
                                                                                 str(tmp_path / "new_names.pt"))]
    assert (scores[0] - scores[1]).abs().max() == 0 and (scores[0] - scores[2]).abs().max() == 0
    from safetensors.torch import save_file

    bad = {k: v.contiguous() for k, v in state.items() if k != "rm_head.5.weight"}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(BadWeightsError, match=r"does not fit HPSv3's reward head.*5.weight"):
        hpsv3.build_scorer(_cfg(path=str(tmp_path / "bad.safetensors")))
    (tmp_path / "cut.safetensors").write_bytes(open(path, "rb").read()[:2000])
    with pytest.raises(BadWeightsError, match=r"could not be read: corrupt, truncated"):
        hpsv3.build_scorer(_cfg(path=str(tmp_path / "cut.safetensors")))
    with pytest.raises(WeightsNotFoundError, match=r"does not exist. Point config.reward.hpsv3.path"):
        hpsv3.build_scorer(_cfg(path=str(tmp_path / "missing.safetensors")))


def test_offline_error_names_repo_file_and_key(offline):
    with pytest.raises(WeightsNotFoundError) as e:
        hpsv3.build_scorer(config("config/align_prop.py:aesthetic").reward.hpsv3)
    message = str(e.value)
    assert "'MizzenAI/HPSv3'" in message and "'HPSv3.safetensors'" in message
    assert "config.reward.hpsv3.path" in message


def test_registered_and_settings_checked():
    assert rewards.registry()["hpsv3"].section == "hpsv3"
    c = config(overrides={"reward_fn": "hpsv3", "reward.hpsv3.model": "qwen", "reward.hpsv3.min_pixels": 0})
    assert set(rewards.problems(c)) == {
        "config.reward.hpsv3.model='qwen': must be 'HPSv3' (Qwen2-VL-7B + the official reward head) or 'tiny' (a "
        "tiny random Qwen2-VL, offline)",
        "config.reward.hpsv3.min_pixels=0: must be a whole number of pixels >= 784 (one 28x28 token); the official "
        "value is 200704 (256 x 28 x 28)"}
    c = config(overrides={"reward_fn": "hpsv3", "reward.hpsv3.min_pixels": 5000, "reward.hpsv3.max_pixels": 4000})
    assert rewards.problems(c) == ["config.reward.hpsv3.min_pixels=5000 is above config.reward.hpsv3.max_pixels=4000"]
    assert rewards.problems(config("config/align_prop.py:hpsv3")) == []


def test_patchify_is_the_processors_layout():
    """Patch order against Qwen2VLImageProcessorPil on pixels that need no resize or rounding (identity check)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pixels = np.random.default_rng(0).random((56, 84, 3))
    processor = Qwen2VLImageProcessorPil(do_resize=False, do_rescale=False, do_normalize=False)
    expected = processor(images=[pixels], return_tensors="pt")
    patches, gh, gw = hpsv3.patchify(torch.from_numpy(pixels).permute(2, 0, 1)[None].float(), 14, 2, 2)
    assert expected["image_grid_thw"].tolist() == [[1, gh, gw]] == [[1, 4, 6]]
    torch.testing.assert_close(patches, expected["pixel_values"].float(), rtol=0, atol=1e-6)


def test_full_size_branch_with_the_backbone_files_stubbed(official, monkeypatch):
    """`model="HPSv3"` end to end but for the downloads: the backbone's config, tokenizer and image processor are
    the tiny ones, so the meta build, the embedding check, the buffers and the normalization are exercised."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path, _, _, tokenizer, _ = official
    files = {"AutoConfig": lambda: hpsv3.tiny_config(tokenizer), "AutoTokenizer": hpsv3.tiny_tokenizer,
             "AutoImageProcessor": Qwen2VLImageProcessorPil}
    monkeypatch.setattr(hpsv3, "load_pretrained", lambda cls, name, key: files[cls.__name__]())
    full = hpsv3.build_scorer(_cfg(model="HPSv3", path=path, min_pixels=3136, max_pixels=3136))
    tiny = hpsv3.build_scorer(_cfg(path=path, min_pixels=3136, max_pixels=3136))
    assert full.mean == hpsv3.CLIP_MEAN and full.std == hpsv3.CLIP_STD
    images = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(full(images, PROMPTS), tiny(images, PROMPTS), rtol=0, atol=0)

    def larger_tokenizer():  # a vocabulary beyond the checkpoint's embedding: another backbone's tokenizer
        extra = hpsv3.tiny_tokenizer()
        extra.add_special_tokens({"additional_special_tokens": [f"<|extra_{i}|>" for i in range(10)]})
        return extra

    files["AutoTokenizer"] = larger_tokenizer
    with pytest.raises(BadWeightsError, match=r"does not cover the tokenizer of config.reward.hpsv3.backbone"):
        hpsv3.build_scorer(_cfg(model="HPSv3", path=path))
