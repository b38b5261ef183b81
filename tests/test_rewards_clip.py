"""PickScore and CLIP score: tiny CLIPs saved with `save_pretrained`, loaded through the real path."""

import pytest
import torch
from transformers import CLIPImageProcessor, CLIPProcessor

import reference_preprocess as ref
from alignprop.rewards import clipscore, towers
from alignprop.rewards.loading import BadWeightsError, WeightsNotFoundError
from alignprop.tokenizers import clip_tokenizer
from helpers import config, make_reward


def base():
    return config("config/align_prop.py:aesthetic")

PROMPTS = ["a photo of a cat", "an oil painting of a lighthouse at night"]
# Not CLIP's constants: the test shows they come from the saved processor.
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(model folder, processor folder, the model) in the on-disk format of the hub repos."""
    model = towers.tiny_clip(seed=3)
    model_dir = tmp_path_factory.mktemp("pickscore_model")
    model.save_pretrained(model_dir)
    processor_dir = tmp_path_factory.mktemp("pickscore_processor")
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=MEAN, image_std=STD
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=clip_tokenizer()).save_pretrained(processor_dir)
    return str(model_dir), str(processor_dir), model


def _images(n=2, size=48, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_transformers_returns_projected_embeddings_in_pooler_output(saved):
    """Pins the transformers API the scorer relies on: `pooler_output` of get_*_features is the projection.

    (transformers 5 returns a BaseModelOutputWithPooling; transformers 4 returned the tensor itself.)
    """
    _, _, model = saved
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = clip_tokenizer()(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        image_embeds = clipscore.projected_embeds(model.get_image_features(pixel_values=pixels))
        text_embeds = clipscore.projected_embeds(
            model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        )
        expected_image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        expected_text = model.text_projection(
            model.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output
        )
    assert image_embeds.shape == text_embeds.shape == (2, model.config.projection_dim)
    torch.testing.assert_close(image_embeds, expected_image)
    torch.testing.assert_close(text_embeds, expected_text)


@pytest.mark.parametrize("name", ["pickscore", "clipscore"])
def test_loads_saved_folders_and_scores(saved, name):
    model_dir, processor_dir, model = saved
    cfg = base().reward[name]
    cfg.model, cfg.processor = model_dir, processor_dir
    scorer = clipscore.build_scorer(cfg, name, use_logit_scale=name == "pickscore")
    assert scorer.mean == MEAN and scorer.std == STD
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(scorer.model.state_dict()[key], tensor, msg=key)
    images = _images().requires_grad_()
    scores = scorer(images, PROMPTS)
    assert scores.shape == (2,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    scores.sum().backward()
    assert images.grad.abs().sum() > 0
    assert all(p.grad is None for p in scorer.parameters())
    with torch.no_grad():  # reference: normalized projections from the model's own forward
        pixels = clipscore.clip_preprocess(images, 32, MEAN, STD)
        tokens = clip_tokenizer()(PROMPTS, padding=True, return_tensors="pt")
        out = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels)
        cosine = (out.image_embeds * out.text_embeds).sum(-1)  # both L2-normalized by CLIPModel
    expected = model.logit_scale.exp() * cosine if name == "pickscore" else cosine
    torch.testing.assert_close(scores.detach(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["pickscore", "clipscore"])
def test_offline_error_names_repo_and_key(name, offline):
    cfg = base().reward[name]
    with pytest.raises(WeightsNotFoundError) as e:
        clipscore.build_scorer(cfg, name, use_logit_scale=False)
    message = str(e.value)
    assert repr(cfg.model) in message and f"config.reward.{name}.model" in message


def test_missing_local_folder_is_a_clear_error(tmp_path):
    cfg = base().reward.clipscore
    cfg.model = str(tmp_path / "no_such_model")
    with pytest.raises(WeightsNotFoundError, match=r"config.reward.clipscore.model="):
        clipscore.build_scorer(cfg, "clipscore", use_logit_scale=False)


def test_tiny_rewards_through_the_registry():
    for name in ("clipscore", "pickscore"):
        images = _images().requires_grad_()
        rewards, components, info = make_reward(name)(images, PROMPTS, [{}, {}])
        assert rewards.shape == (2,) and rewards.dtype == torch.float32 and list(components) == [name]
        assert set(info) == ({"clipscore/clip_score"} if name == "clipscore" else set())
        rewards.sum().backward()
        assert images.grad.abs().sum() > 0


def test_clipscore_logs_the_conventional_clip_score():
    """The reward is the cosine (a gradient everywhere); the log has torchmetrics' 100 x max(cosine, 0) beside it."""
    cosine = torch.tensor([-0.2, 0.0, 0.31])
    torch.testing.assert_close(clipscore.clip_score(cosine), torch.tensor([0.0, 0.0, 31.0]))
    rewards, components, info = make_reward("clipscore")(_images(), PROMPTS, [{}, {}])
    torch.testing.assert_close(info["clipscore/clip_score"], 100 * rewards.clamp(min=0))


@pytest.mark.parametrize("shape", [(48, 67), (67, 48), (512, 703)])
@pytest.mark.parametrize("name", ["pickscore", "clipscore"])
def test_non_square_images_score_as_with_the_clip_processor(saved, shape, name):
    """Against the model on the pixels of transformers' CLIPImageProcessor (PickScore's code, torchmetrics), uint8.

    Measured |difference| of the cosine (~0.03-0.05): 1.7e-5-1.7e-4 now (uint8 rounding); 0.002-0.017 with the former
    bilinear preprocessing; at 512x703 torchvision's crop offset (42, not the processor's 41) alone is 0.025 off.
    """
    model_dir, processor_dir, model = saved
    cfg = base().reward[name]
    cfg.model, cfg.processor = model_dir, processor_dir
    scorer = clipscore.build_scorer(cfg, name, use_logit_scale=False)
    array = ref.photo("rocket", *shape)
    tokens = clip_tokenizer()(PROMPTS[:1], padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = scorer(ref.as_tensor(array), PROMPTS[:1])
        pixels = ref.transformers_clip(array, 32, MEAN, STD)
        out = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels)
    torch.testing.assert_close(ours, (out.image_embeds * out.text_embeds).sum(-1), rtol=0, atol=5e-4)


def _broken_copy(saved, tmp_path, rewrite):
    """A copy of the saved model folder whose model.safetensors is replaced by `rewrite(state) -> bytes or dict`."""
    import shutil

    from safetensors.torch import load_file, save_file

    model_dir, processor_dir, _ = saved
    broken = tmp_path / "model"
    shutil.copytree(model_dir, broken)
    weights = broken / "model.safetensors"
    new = rewrite(weights.read_bytes(), load_file(str(weights)))
    if isinstance(new, bytes):
        weights.write_bytes(new)
    else:
        save_file(new, str(weights), metadata={"format": "pt"})
    cfg = base().reward.clipscore
    cfg.model, cfg.processor = str(broken), processor_dir
    return cfg


def test_truncated_local_weights_are_a_clear_error(saved, tmp_path):
    cfg = _broken_copy(saved, tmp_path, lambda data, state: data[: len(data) // 2])
    with pytest.raises(BadWeightsError) as e:
        clipscore.build_scorer(cfg, "clipscore", use_logit_scale=False)
    message = str(e.value)
    assert f"Could not load CLIPModel from config.reward.clipscore.model='{cfg.model}' (a local folder)" in message
    assert "no truncated file; re-download or re-save it" in message


def test_weights_of_another_model_are_an_error_not_a_random_init(saved, tmp_path):
    cfg = _broken_copy(
        saved, tmp_path, lambda data, state: {k.replace("vision_model.", "vision."): v for k, v in state.items()}
    )
    with pytest.raises(BadWeightsError) as e:
        clipscore.build_scorer(cfg, "clipscore", use_logit_scale=False)
    message = str(e.value)
    assert f"config.reward.clipscore.model='{cfg.model}' lacks" in message and "vision_model." in message
    assert "holds the weights of another model" in message
