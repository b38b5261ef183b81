"""`config.random_weights`: the published architectures, built without reading any weights."""


from alignprop.random_init import build_sd15_components, build_vit_l14_vision


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_sd15_architecture_has_the_published_parameter_counts():
    # On the meta device: shapes only, no memory, no time.
    c = build_sd15_components(device="meta")
    # runwayml/stable-diffusion-v1-5: UNet 859.5M, VAE 83.7M, CLIP ViT-L/14 text encoder 123.1M.
    assert (_count(c["unet"]), _count(c["vae"]), _count(c["text_encoder"])) == (859_520_964, 83_653_863, 123_060_480)
    assert c["scheduler"].config.beta_schedule == "scaled_linear" and not c["scheduler"].config.clip_sample
    assert c["tokenizer"]("a cat").input_ids[0] == 49406  # CLIP's BOS: the real vocabulary


def test_vit_l14_tower_and_reward_models_from_config():
    import ml_collections

    from alignprop.rewards import aesthetic, hps

    # openai/clip-vit-large-patch14 vision tower 303.2M + its 1024x768 projection.
    assert _count(build_vit_l14_vision(device="meta")) == 303_179_776 + 1024 * 768
    cfg = ml_collections.ConfigDict(dict(clip_model="openai/clip-vit-large-patch14", mlp_path=None))
    scorer = aesthetic.build_scorer(cfg, random_weights=True, device="meta")
    assert _count(scorer.mlp) > 0 and scorer.vision_model.config.patch_size == 14
    hps_cfg = ml_collections.ConfigDict(dict(model="ViT-H-14", path=None, repo="x", file="y"))
    hps_scorer = hps.build_scorer(hps_cfg, "hps", random_weights=True, device="meta")
    assert _count(hps_scorer.model) == 986_109_441  # open_clip ViT-H-14 (HPSv2's architecture)

