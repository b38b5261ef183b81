"""Object count: the soft count, a tiny OWL-ViT saved with `save_pretrained` and loaded by the real path."""

import math

import pytest
import torch
from transformers import OwlViTImageProcessor, OwlViTProcessor

import geneval_reference
import reference_preprocess as ref
from alignprop.rewards import RewardInputError, object_count, towers
from alignprop.rewards.loading import WeightsNotFoundError
from alignprop.tokenizers import clip_tokenizer
from helpers import config, make_reward


def base():
    return config("config/align_prop.py:object_count")

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
METADATA = [{"object": "apple", "count": 3}, {"object": "teddy bear", "count": 1}]
PROMPTS = ["three apples", "one teddy bear"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny OWL-ViT and its processor in the on-disk format of `google/owlvit-base-patch32`."""
    model = towers.tiny_owlvit(seed=1)
    folder = tmp_path_factory.mktemp("owlvit")
    model.save_pretrained(folder)
    image_processor = OwlViTImageProcessor(
        size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32}, image_mean=MEAN, image_std=STD
    )
    tokenizer = clip_tokenizer()
    tokenizer.model_max_length = model.config.text_config.max_position_embeddings  # 16, as OWL-ViT's
    OwlViTProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return str(folder), model


def _cfg(**overrides):
    cfg = base().reward.object_count
    cfg.update(overrides)
    return cfg


def _images(n=2, size=40, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_soft_count_equals_hard_count_far_from_threshold():
    threshold, temperature = 0.1, 0.25
    t = math.log(threshold / (1 - threshold))
    # 3 boxes well above the threshold, 500 background boxes well below (as a real detector's).
    logits = torch.cat([t + torch.tensor([3.0, 5.0, 8.0]), torch.full((500,), -9.0)])[None]
    torch.testing.assert_close(
        object_count.soft_count(logits, threshold, temperature), torch.tensor([3.0]), atol=1e-3, rtol=0
    )
    assert object_count.hard_count(logits, threshold).item() == 3
    # Near the threshold it is fractional and has a gradient.
    near = torch.tensor([[t, t + 0.1]], requires_grad=True)
    soft = object_count.soft_count(near, threshold, temperature)
    assert 0.5 < soft.item() < 2
    soft.backward()
    assert (near.grad > 0).all()


def test_loads_saved_folder_counts_and_is_differentiable(saved):
    folder, model = saved
    counter = object_count.build_counter(_cfg(model=folder))
    assert counter.mean == MEAN and counter.std == STD and counter.image_size == 32
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(counter.detector.state_dict()[key], tensor, msg=key)
    images = _images().requires_grad_()
    logits = counter(images, ["apple", "teddy bear"])
    assert logits.shape == (2, (32 // 8) ** 2)  # one box per patch
    soft = object_count.soft_count(logits, 0.1, 0.25)
    soft.sum().backward()
    assert images.grad.abs().sum() > 0
    assert all(p.grad is None for p in counter.parameters())
    # Reference: the detector's own forward on the same pixels and the processor's query tokens.
    processor = OwlViTProcessor.from_pretrained(folder)
    tokens = processor(text=["a photo of a apple", "a photo of a teddy bear"], return_tensors="pt")
    with torch.no_grad():
        pixels = object_count.clip_preprocess(images, 32, MEAN, STD, mode="squash")
        expected = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels).logits[
            ..., 0
        ]
    torch.testing.assert_close(logits.detach(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(48, 67), (67, 48), (512, 703)])
def test_non_square_images_score_as_with_the_owlvit_processor(saved, shape):
    """Box logits vs the detector on the pixels of OWL-ViT's processor (PIL bicubic, squashed to a square), uint8.

    The tiny random detector is very sensitive (logits up to ~30; 1e-3 of pixel noise moves them by 0.1): measured
    max |difference| 0.42-0.62 now (the processor's uint8 rounding), 9.6-10.4 with the former bilinear resize.
    """
    folder, model = saved
    counter = object_count.build_counter(_cfg(model=folder))
    array = ref.photo("coffee", *shape)
    tokens = OwlViTProcessor.from_pretrained(folder)(text=["a photo of a cup"], return_tensors="pt")
    with torch.no_grad():
        ours = counter(ref.as_tensor(array), ["cup"])
        pixels = ref.owlvit(array, 32, MEAN, STD)
        expected = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels).logits
    torch.testing.assert_close(ours, expected[..., 0], rtol=0, atol=1.0)


def test_soft_count_of_the_detector_equals_its_hard_count_when_decisive(saved, monkeypatch):
    """Shift and scale the class head's logits so that every box is far from the threshold: soft = hard count."""
    folder, _ = saved
    counter = object_count.build_counter(_cfg(model=folder))
    head = counter.detector.class_head
    images = _images(4, seed=2)
    objects = ["apple", "cup", "dog", "car"]
    # logits = (similarity + shift) * (elu(scale) + 1): first the raw similarities (shift 0, scale 1) ...
    with torch.no_grad():
        for layer in (head.logit_shift, head.logit_scale):
            layer.weight.zero_()
            layer.bias.zero_()
        similarity = counter(images, objects).flatten().sort().values
        # ... then cut them in the middle of their widest gap (some boxes in, some out) and spread them apart.
        middle = similarity[len(similarity) // 4 : 3 * len(similarity) // 4]
        gaps = middle[1:] - middle[:-1]
        i = gaps.argmax()
        cut, half_gap = (middle[i] + middle[i + 1]) / 2, gaps[i] / 2
        head.logit_shift.bias.fill_(-cut.item())
        head.logit_scale.bias.fill_(20 / half_gap.item())  # every logit >= 20 away from 0
    monkeypatch.setattr(object_count, "build_counter", lambda cfg, seed=0: counter)
    reward_fn = make_reward("object_count")
    metadata = [{"object": o, "count": 2} for o in objects]
    logits, boxes = counter.detect(images, objects)
    t = math.log(0.1 / 0.9)
    assert ((logits - t).abs() > 10 * config().reward.object_count.temperature).all(), "premise: decisive boxes"
    rewards, _, info = reward_fn(images, ["two things"] * 4, metadata)
    info = {k.removeprefix("object_count/"): v for k, v in info.items()}
    # The count is GenEval's: detections above the threshold, greedy NMS at reward.object_count.nms_iou (0.5).
    hard = geneval_reference.count(logits, boxes, 0.1, 0.5)
    assert 0 < hard.sum() < (logits > t).sum()  # some boxes in, some out, some duplicates: the test can tell
    torch.testing.assert_close(info["soft_count"], hard, atol=1e-3, rtol=0)
    torch.testing.assert_close(rewards, -(hard - 2).abs(), atol=1e-3, rtol=0)
    torch.testing.assert_close(info["count_error"], (hard - 2).abs())
    torch.testing.assert_close(info["count_exact"], (hard == 2).float())


def test_owlv2_folder_loads_and_pads_to_square(tmp_path):
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    owlvit_config = towers.tiny_owlvit().config
    torch.manual_seed(0)
    model = Owlv2ForObjectDetection(
        Owlv2Config(
            text_config=owlvit_config.text_config.to_dict(),
            vision_config=owlvit_config.vision_config.to_dict(),
            projection_dim=owlvit_config.projection_dim,
        )
    )
    model.save_pretrained(tmp_path)
    tokenizer = clip_tokenizer()
    tokenizer.model_max_length = 16
    image_processor = Owlv2ImageProcessor(size={"height": 32, "width": 32})
    Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(tmp_path)
    counter = object_count.build_counter(_cfg(model=str(tmp_path)))
    assert isinstance(counter.detector, Owlv2ForObjectDetection) and counter.pad_to_square
    images = torch.rand(2, 3, 24, 40, generator=torch.Generator().manual_seed(0)).requires_grad_()
    logits = counter(images, ["apple", "cup"])
    assert logits.shape == (2, 16)
    object_count.soft_count(logits, 0.1, 0.25).sum().backward()
    assert images.grad.abs().sum() > 0
    # Non-square, against the pixels of OWLv2's own processor (pad to square, Gaussian antialias, bilinear).
    array = ref.photo("coffee", 48, 67)
    tokens = Owlv2Processor.from_pretrained(tmp_path)(text=["a photo of a cup"], return_tensors="pt")
    with torch.no_grad():
        ours = counter(ref.as_tensor(array), ["cup"])
        expected = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                         pixel_values=ref.owlv2(array, 32)).logits[..., 0]
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-3)


def test_tiny_reward_shape_info_and_gradient():
    images = _images().requires_grad_()
    rewards, _, info = make_reward("object_count")(images, PROMPTS, METADATA)
    assert rewards.shape == (2,) and rewards.dtype == torch.float32 and torch.isfinite(rewards).all()
    assert (rewards <= 0).all()
    assert set(info) == {"object_count/soft_count", "object_count/count_error", "object_count/count_exact"}
    assert all(v.shape == (2,) for v in info.values())
    rewards.sum().backward()
    assert images.grad.abs().sum() > 0


def test_missing_metadata_names_the_prompt_and_what_it_needs():
    with pytest.raises(RewardInputError) as e:
        make_reward("object_count")(_images(), ["cat", "dog"], [{}, {}])
    message = str(e.value)
    assert "prompt 'cat'" in message and "has no 'object' and no 'count'" in message
    assert "object/count metadata" in message and "config.prompt_fn='counting'" in message


def test_settings_are_start_up_problems():
    cfg = _cfg(query="a photo", threshold=1.5, temperature=0.0, nms_iou=0.0, rank_weight=-1.0)
    problems = object_count.problems(cfg, "config.reward.object_count")
    for needle in (
        "config.reward.object_count.query='a photo': must contain '{}'",
        "config.reward.object_count.threshold=1.5: must be a probability in (0, 1)",
        "config.reward.object_count.temperature=0.0: must be > 0",
        "config.reward.object_count.nms_iou=0.0: must be an IoU in (0, 1]",
        "config.reward.object_count.rank_weight=-1.0: must be >= 0",
    ):
        assert any(needle in p for p in problems), needle


def test_non_detector_model_is_a_clear_error(tmp_path):
    towers.tiny_clip().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"is a 'clip' model; object_count needs one of owlvit, owlv2"):
        object_count.build_counter(_cfg(model=str(tmp_path)))


def test_offline_error_names_repo_and_key(offline):
    with pytest.raises(WeightsNotFoundError) as e:
        object_count.build_counter(_cfg())
    message = str(e.value)
    assert "'google/owlvit-base-patch32'" in message and "config.reward.object_count.model" in message


@pytest.mark.parametrize(
    "value,count",
    [
        (3, 3),
        (0, 0),
        (3.0, 3),
        ("3", 3),
        (" 4 ", 4),
        ("three", None),
        (2.5, None),
        (-1, None),
        (True, None),
        (None, None),
    ],
)
def test_parse_count(value, count):
    assert object_count.parse_count(value) == count


def test_unparsable_count_names_the_prompt():
    metadata = [{"object": "apple", "count": 3}, {"object": "teddy bear", "count": "a few"}]
    with pytest.raises(RewardInputError) as e:
        make_reward("object_count")(_images(), PROMPTS, metadata)
    assert "prompt 'one teddy bear': it has 'count': 'a few'; it must be a whole number >= 0" in str(e.value)
