"""AlignProp experiments: each a small function that starts from `base()` (config/base.py) and changes a few fields.

Launch (one or many GPUs):
    accelerate launch scripts/train.py --config config/align_prop.py:aesthetic
    accelerate launch scripts/train.py --config config/align_prop.py:aesthetic_k1 --config.train.learning_rate=5e-4
    accelerate launch scripts/train.py --config config/align_prop.py:aesthetic_hps --config.reward_fn=aesthetic:1,hps:10
    accelerate launch scripts/train.py --config config/align_prop.py:hps_flux       # FLUX.1-dev (SD3.5: hps_sd35)
    accelerate launch scripts/train.py --config config/align_prop.py:aesthetic_sdxl_k1 --config.sample.width=1344 \
        --config.sample.height=768                                    # SDXL at one of its training aspect ratios
Offline machine: point each reward's weights at local copies, e.g. --config.reward.hps.path=/data/HPS_v2_compressed.pt
--config.prompt_fn=hps_v2_train:/data/hpdv2_benchmark --config.eval_prompt_fn=hps_v2_eval:/data/hpdv2_benchmark.
Offline CPU run on tiny random models (seconds):
    python scripts/train.py --config config/align_prop.py:tiny
    python scripts/train.py --config config/align_prop.py:tiny --config.reward_fn=hps        # any reward, or a sum
    python scripts/train.py --config config/align_prop.py:tiny_sd21                      # SD 2.x-shaped, v-prediction
    python scripts/train.py --config config/align_prop.py:tiny_sd3                       # SD3.5-shaped, flow matching
    python scripts/train.py --config config/align_prop.py:tiny_flux                      # FLUX.1-dev-shaped
    python scripts/train.py --config config/align_prop.py:tiny_sdxl                      # SDXL-shaped

Batch sizes are stated for the whole run (all GPUs); the per-GPU capacity is `train.batch_size_per_gpu`
and gradient accumulation is derived from the number of processes at start-up.
"""

import importlib.util
import os


def _sibling(name):
    # By path: config files are loaded by path, not imported as a package.
    spec = importlib.util.spec_from_file_location(f"alignprop_config_{name}", os.path.join(os.path.dirname(__file__),
                                                                                          f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


base = _sibling("base").base
models = _sibling("models")  # each family's full-size settings
DEFAULT = "aesthetic"


def aesthetic():
    """The paper's aesthetic experiment on SD 1.5: randomized truncation K ~ U[1, 50], effective batch 128."""
    config = base()
    config.reward_fn = "aesthetic"
    config.prompt_fn = "simple_animals"
    config.eval_prompt_fn = "eval_simple_animals"
    # The paper stops aesthetic training early, after 7 epochs (before over-optimization).
    config.num_epochs = 7
    config.train.truncation = "uniform"
    config.train.k_min, config.train.k_max = 1, 50
    return config


def aesthetic_k1():
    """Aesthetic with K=1: only the last UNet call keeps gradients (the low-memory mode)."""
    config = aesthetic()
    config.train.truncation = "fixed"
    config.train.k = 1
    return config


def hps():
    """HPSv2 image-text alignment on the HPSv2 benchmark prompts, randomized truncation."""
    config = base()
    config.reward_fn = "hps"
    config.prompt_fn = "hps_v2_train"
    config.eval_prompt_fn = "hps_v2_eval"
    config.num_epochs = 200
    config.train.truncation = "uniform"
    config.train.k_min, config.train.k_max = 1, 50
    return config


def hps_k1():
    """HPSv2 with K=1."""
    config = hps()
    config.train.truncation = "fixed"
    config.train.k = 1
    return config


def hps_v21():
    """HPSv2.1 on the HPSv2 benchmark prompts, randomized truncation."""
    config = hps()
    config.reward_fn = "hps_v21"
    return config


def compressibility():
    """Minimize the (differentiable surrogate) JPEG size of images of simple animals."""
    config = base()
    config.reward_fn = "compressibility"
    config.prompt_fn = "simple_animals"
    config.eval_prompt_fn = "eval_simple_animals"
    config.num_epochs = 20
    config.train.truncation = "uniform"
    config.train.k_min, config.train.k_max = 1, 50
    return config


def incompressibility():
    """Maximize the (differentiable surrogate) JPEG size of images of simple animals."""
    config = compressibility()
    config.reward_fn = "incompressibility"
    return config


def object_count():
    """Generate the number of objects a prompt asks for ("three apples"); held-out objects for evaluation."""
    config = base()
    config.reward_fn = "object_count"
    config.prompt_fn = "counting"
    config.eval_prompt_fn = "eval_counting"
    config.num_epochs = 50
    config.train.truncation = "uniform"
    config.train.k_min, config.train.k_max = 1, 50
    return config


def pickscore():
    """PickScore on the HPSv2 benchmark prompts, randomized truncation."""
    config = hps()
    config.reward_fn = "pickscore"
    return config


def hpsv3():
    """HPSv3 (Qwen2-VL-7B reward model, ~16 GB in bf16 besides SD) on the HPSv2 benchmark prompts."""
    config = hps()
    config.reward_fn = "hpsv3"
    return config


def aesthetic_hps():
    """A weighted sum of rewards on the HPSv2 prompts: aesthetic + 20 x HPSv2.

    HPSv2 moves ~20x less than the aesthetic score under training (about 0.25 -> 0.3 versus 5 -> 7), so a
    weight of 20 lets both pull on the LoRA about equally; change it to trade one off against the other.
    """
    config = hps()
    config.reward_fn = "aesthetic:1.0,hps:20.0"
    return config


def aesthetic_sd21():
    """The aesthetic experiment on Stable Diffusion 2.1 (768 px, v-prediction), K ~ U[1, 50]."""
    config = aesthetic()
    models.sd21(config)
    return config


def hps_sd21():
    """HPSv2 on Stable Diffusion 2.1 (768 px, v-prediction), K ~ U[1, 50]."""
    config = hps()
    models.sd21(config)
    return config


def aesthetic_draft_k():
    """DRaFT-K (Clark et al. 2023): the last K=1 steps keep gradients, K fixed (the paper's best K)."""
    config = aesthetic()
    config.train.method, config.train.truncation, config.train.k = "draft_k", "fixed", 1
    return config


def aesthetic_draft_lv():
    """DRaFT-LV: K=1 on n=2 re-noised copies of the last step (lower-variance gradients)."""
    config = aesthetic()
    config.train.method, config.train.lv_copies = "draft_lv", 2
    return config


def aesthetic_refl():
    """ReFL (ImageReward): one step s of the last 10 with gradients, the reward on its predicted clean sample."""
    config = aesthetic()
    config.train.method, config.train.stop_last = "refl", 10
    return config


def aesthetic_drtune():
    """DRTune: 3 evenly spaced steps of 0..s with their inputs detached, s in the last 20 (0.4 of 50 steps)."""
    config = aesthetic()
    config.train.method, config.train.drtune_k, config.train.stop_last = "drtune", 3, 20
    return config


def hps_kl():
    """HPSv2 with DRaFT+'s prediction-distance penalty, and held-out rewards on the evaluation images."""
    config = hps_k1()
    config.train.kl_coeff = 0.2
    config.eval_rewards = "aesthetic,pickscore"
    return config


def aesthetic_sd35():
    """The aesthetic experiment on Stable Diffusion 3.5 medium (1024 px, 28 flow-matching steps, CFG 7.0),
    K ~ U[1, 28]."""
    config = aesthetic()
    models.sd35(config)
    return config


def hps_sd35():
    """HPSv2 on Stable Diffusion 3.5 medium (1024 px, 28 steps, CFG 7.0), K ~ U[1, 28]."""
    config = hps()
    models.sd35(config)
    return config


def hps_flux():
    """HPSv2 on FLUX.1-dev (1024 px, 28 steps, distilled guidance 3.5, no CFG), K ~ U[1, 28]."""
    config = hps()
    models.flux(config)
    return config


def pickscore_flux():
    """PickScore on FLUX.1-dev (1024 px, 28 steps, distilled guidance 3.5), K ~ U[1, 28]."""
    config = pickscore()
    models.flux(config)
    return config


def aesthetic_sdxl():
    """The aesthetic experiment on SDXL base 1.0 (1024 px), K ~ U[1, 50], effective batch 128."""
    config = aesthetic()
    models.sdxl(config)
    return config


def aesthetic_sdxl_k1():
    """Aesthetic on SDXL with K=1: the low-memory mode (batch 1 fits a 24 GB card)."""
    config = aesthetic_sdxl()
    config.train.truncation = "fixed"
    config.train.k = 1
    return config


def hps_sdxl():
    """HPSv2 on SDXL base 1.0 (1024 px), K ~ U[1, 50]."""
    config = hps()
    models.sdxl(config)
    return config


def evaluate():
    """Evaluation only: load a checkpoint (`resume_from`) or none, evaluate on unseen prompts, write eval.json."""
    config = aesthetic()
    config.num_epochs = 0
    config.eval_freq = 1
    return config


def tiny():
    """Tiny random models on the CPU, fp32, offline: the whole pipeline in seconds."""
    config = aesthetic()
    models.tiny(config)
    return config


def tiny_sd21():
    """`tiny` with tiny SD 2.x-shaped models that predict v (as SD 2.1), and guidance rescale."""
    config = tiny()
    models.tiny_sd21(config)
    return config


def tiny_sd3():
    """`tiny` with tiny SD3.5-shaped models (MMDiT, CLIP-L + CLIP-G + T5, flow matching, CFG 7.0), the text
    encoders offloaded and their embeddings cached (as the full-size configs)."""
    config = tiny()
    models.tiny_sd3(config)
    return config


def tiny_flux():
    """`tiny` with tiny FLUX.1-dev-shaped models (packed latents, distilled guidance 3.5, no CFG), the text
    encoders offloaded and their embeddings cached."""
    config = tiny()
    models.tiny_flux(config)
    return config


def tiny_sdxl():
    """`tiny` with tiny SDXL-shaped models (two text encoders, micro-conditioning, zero negatives)."""
    config = tiny()
    models.tiny_sdxl(config)
    return config


EXPERIMENTS = {fn.__name__: fn for fn in (
    aesthetic, aesthetic_k1, hps, hps_k1, hps_v21, compressibility, incompressibility, object_count, pickscore,
    hpsv3, aesthetic_hps, aesthetic_sd21, hps_sd21, aesthetic_draft_k, aesthetic_draft_lv, aesthetic_refl,
    aesthetic_drtune, hps_kl, aesthetic_sd35, hps_sd35, hps_flux, pickscore_flux, evaluate, tiny, tiny_sd21, tiny_sd3,
    tiny_flux, aesthetic_sdxl, aesthetic_sdxl_k1, hps_sdxl, tiny_sdxl,
)}


def get_config(name=DEFAULT):
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; valid: {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]()
