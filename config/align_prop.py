"""AlignProp experiment configs.

Launch (one or many GPUs):
    accelerate launch scripts/train.py --config config/align_prop.py:aesthetic
    accelerate launch scripts/train.py --config config/align_prop.py:aesthetic_k1 --config.train.learning_rate=5e-4
    accelerate launch scripts/train.py --config config/align_prop.py:aesthetic_hps --config.reward_fn=aesthetic:1,hps:10
    (config.reward_fn: one reward name, or a weighted sum "name:weight,name:weight"; see alignprop/rewards)
Offline machine: point each reward's weights at local copies, e.g. --config.reward.hps.path=/data/HPS_v2_compressed.pt
--config.prompt_fn=hps_v2_train:/data/hpdv2_benchmark --config.eval_prompt_fn=hps_v2_eval:/data/hpdv2_benchmark.
Offline CPU run on tiny random models (seconds):
    python scripts/train.py --config config/align_prop.py:tiny
    python scripts/train.py --config config/align_prop.py:tiny --config.reward_fn=hps        # any reward, or a sum
    python scripts/train.py --config config/align_prop.py:tiny --config.reward_fn=object_count \
        --config.prompt_fn=counting --config.eval_prompt_fn=eval_counting                 # needs count metadata

Every key is declared once in `base()`; experiments are small functions that change a few fields.
Batch sizes are stated for the whole run (all GPUs); the per-GPU capacity is `train.batch_size_per_gpu`
and gradient accumulation is derived from the number of processes at start-up.
"""

import ml_collections
from ml_collections import config_dict


def base():
    config = ml_collections.ConfigDict()

    # Name of the run folder under `logdir` (default: a timestamp).
    config.run_name = ""
    # Folder that holds run folders (config, metrics.jsonl, checkpoints, images).
    config.logdir = "logs"
    # Seeds every random stream (noise, truncation, prompts, eval), combined with the process index.
    config.seed = 42
    # Precision of the frozen weights and autocast: "no" (fp32), "fp16" or "bf16". LoRA stays fp32.
    config.mixed_precision = "fp16"
    # Allow TF32 matmuls on Ampere+ GPUs (faster, slightly less precise).
    config.allow_tf32 = True
    # Number of epochs; one epoch is `train.total_samples_per_epoch` samples over all GPUs.
    config.num_epochs = 200
    # Save a checkpoint every this many epochs (and at the end).
    config.save_freq = 1
    # Evaluate on `eval_prompt_fn` every this many epochs (0: only at the end).
    config.eval_freq = 1
    # Keep at most this many checkpoints (oldest removed first).
    config.num_checkpoint_limit = 5
    # Resume from a run folder or a checkpoint folder ("" starts fresh).
    config.resume_from = ""
    # Reward to maximize (see alignprop/rewards/__init__.py for the registry).
    config.reward_fn = "aesthetic"
    # Training prompt set (registry name, or "from_file:PATH" with one prompt per line).
    config.prompt_fn = "simple_animals"
    # Evaluation prompt set (unseen prompts).
    config.eval_prompt_fn = "eval_simple_animals"
    # Experiment trackers: "none", "wandb" or "tensorboard" (metrics.jsonl is always written).
    config.log_with = "none"
    # wandb/tensorboard project name.
    config.project_name = "alignprop"
    # Save (and send to the trackers) a grid of training samples every this many optimizer steps (0: never).
    config.log_image_freq = 10

    # Build every model from its architecture with random weights instead of loading it (nothing is
    # downloaded): SD 1.5 whatever pretrained.model says, CLIP ViT-L/14 for aesthetic, the open_clip
    # architecture for hps/hps_v21. Same compute and memory as the real run: for speed, memory and
    # multi-GPU checks on machines without the weights.
    config.random_weights = False

    config.pretrained = pretrained = ml_collections.ConfigDict()
    # Hub id, local diffusers folder, single .safetensors/.ckpt file, or "tiny" (random tiny models, offline).
    pretrained.model = "runwayml/stable-diffusion-v1-5"
    # Hub revision (branch, tag or commit) of the model.
    pretrained.revision = "main"

    config.sample = sample = ml_collections.ConfigDict()
    # DDIM steps of every rollout (T).
    sample.num_steps = 50
    # Classifier-free guidance weight (<= 1 disables guidance).
    sample.guidance_scale = 7.5
    # DDIM eta: 0 is deterministic DDIM, 1 is DDPM-like.
    sample.eta = 0.0
    # Image size in pixels (default: the UNet's native size, 512 for SD 1.5). Multiple of the VAE factor.
    sample.height = config_dict.placeholder(int)
    sample.width = config_dict.placeholder(int)
    # Batch size per GPU of evaluation rollouts (no gradients, so larger than training).
    sample.eval_batch_size = 8
    # Number of evaluation images (prompts cycled in order, fixed initial noise).
    sample.num_eval_samples = 16
    # Show a progress bar over the DDIM steps of every rollout (main process only).
    sample.progress_bar = False

    config.train = train = ml_collections.ConfigDict()
    # Samples per GPU in one forward/backward (what fits in memory). Per GPU!
    train.batch_size_per_gpu = 4
    # Samples per optimizer step over all GPUs; accumulation = total / (per GPU x processes).
    train.total_batch_size = 128
    # Samples per epoch over all GPUs; a multiple of total_batch_size.
    train.total_samples_per_epoch = 256
    # AdamW.
    train.learning_rate = 1e-3
    train.adam_beta1 = 0.9
    train.adam_beta2 = 0.999
    train.adam_weight_decay = 0.1
    train.adam_epsilon = 1e-8
    # 8-bit AdamW from bitsandbytes (must be installed).
    train.use_8bit_adam = False
    # Clip the global gradient norm to this value.
    train.max_grad_norm = 5.0
    # Loss = loss_coeff x (−mean reward, or |reward − reward.target|).
    train.loss_coeff = 0.01
    # Checkpoint each whole UNet call that keeps gradients (recompute in backward; saves memory).
    train.gradient_checkpointing = True
    # ...except the last this many grad steps, whose activations are kept (one UNet forward less per step,
    # the memory of one UNet's activations more per step).
    train.uncheckpointed_steps = 1
    # Also checkpoint inside the UNet's blocks (diffusers' own): halves peak memory (15.5 -> 7.5 GiB at batch 4
    # on an H100, BENCHMARKS.md), costs one more forward per grad step in backward.
    train.checkpoint_unet_blocks = True
    # Run LoRA folded into the weights (W + scale·B·A) instead of peft's side branch: same numbers, ~2x faster.
    train.merged_lora = True
    # Decode latents in chunks of this many images (0: all at once), each chunk checkpointed if enabled below.
    train.decode_batch_size = 1
    # Recompute the VAE decoder in backward instead of storing its activations (the largest memory item).
    train.checkpoint_decode = True
    # Recompute the reward model in backward instead of storing its activations.
    train.checkpoint_reward = False
    # Let cuDNN time its algorithms for each convolution shape on first use and keep the fastest
    # (torch.backends.cudnn.benchmark; the shapes of a run are fixed, so this is paid once).
    train.cudnn_benchmark = True
    # Keep the UNet's convolution weights in channels_last memory format (faster convolutions on GPUs).
    train.channels_last = False
    # torch.compile the UNet for the steps without gradients (compiled once per shape: the first step
    # takes about 4-5 minutes at SD 1.5 size, then a step is ~1.6x faster; BENCHMARKS.md).
    train.compile_unet = True
    # torch.compile the UNet for the steps with gradients too (forward and backward; implies compile_unet).
    train.compile_grad_steps = True
    # torch.compile the VAE decoder (forward and backward).
    train.compile_decoder = True
    # torch.compile mode ("default", "max-autotune-no-cudagraphs", ...) and backend ("inductor"; "aot_eager"
    # traces without generating kernels, for tests).
    train.compile_mode = "default"
    # What torch.compile sees: "model" (the whole UNet as one graph) or "blocks" (each attention and ResNet
    # block on its own, for every UNet call: regional compilation, fewer and smaller graphs to compile;
    # on the H100 it compiled no faster and stepped 1.4-1.7x slower, BENCHMARKS.md).
    train.compile_scope = "model"
    # Share of its activations a compiled UNet step keeps for backward (1.0: PyTorch's default; lower
    # values recompute cheap ops in backward, a finer-grained alternative to checkpoint_unet_blocks).
    train.compile_memory_budget = 1.0
    train.compile_backend = "inductor"
    # Truncated backprop: "fixed" (K = train.k), "uniform" (K ~ U[k_min, k_max]) or
    # "gaussian" (cut point ~ N(cut_mean, cut_std), K = num_steps − cut, clipped to [k_min, k_max]).
    train.truncation = "uniform"
    # K for "fixed": gradients through the last K UNet calls.
    train.k = 1
    # Bounds of K for "uniform" and "gaussian" (1 <= k_min <= k_max <= sample.num_steps).
    train.k_min = 1
    train.k_max = 50
    # Cut point distribution for "gaussian" (step index from which gradients flow).
    train.cut_mean = 42.0
    train.cut_std = 5.0
    # Stop after this many consecutive optimizer steps with a non-finite loss or gradient.
    train.max_nonfinite_steps = 5

    config.lora = lora = ml_collections.ConfigDict()
    # LoRA rank and alpha (scale = alpha / rank) on to_q/to_k/to_v/to_out.0 of every attention block.
    lora.rank = 4
    lora.alpha = 4.0

    config.reward = reward = ml_collections.ConfigDict()
    # If set, loss is |reward − target| instead of −reward.
    reward.target = config_dict.placeholder(float)
    reward.aesthetic = aesthetic = ml_collections.ConfigDict()
    # CLIP image tower: hub id, local folder, or "tiny".
    aesthetic.clip_model = "openai/clip-vit-large-patch14"
    # Hub repo and file of the LAION MLP (sac+logos+ava1-l14-linearMSE).
    aesthetic.mlp_repo = "trl-lib/ddpo-aesthetic-predictor"
    aesthetic.mlp_file = "aesthetic-model.pth"
    # Local path of the MLP weights; overrides the hub download.
    aesthetic.mlp_path = config_dict.placeholder(str)

    reward.hps = hps = ml_collections.ConfigDict()
    # open_clip architecture of HPSv2 ("ViT-H-14"), or "tiny" (random tiny model, offline).
    hps.model = "ViT-H-14"
    # Hub repo and file of the HPSv2 checkpoint (a dict with a `state_dict` key).
    hps.repo = "xswu/HPSv2"
    hps.file = "HPS_v2_compressed.pt"
    # Local path of the checkpoint; overrides the hub download.
    hps.path = config_dict.placeholder(str)
    reward.hps_v21 = hps_v21 = ml_collections.ConfigDict()
    # HPSv2.1: same architecture, retrained weights; keys as in `reward.hps`.
    hps_v21.model = "ViT-H-14"
    # Hub repo and file of the HPSv2.1 checkpoint.
    hps_v21.repo = "xswu/HPSv2"
    hps_v21.file = "HPS_v2.1_compressed.pt"
    # Local path of the checkpoint; overrides the hub download.
    hps_v21.path = config_dict.placeholder(str)

    reward.pickscore = pickscore = ml_collections.ConfigDict()
    # PickScore CLIP ViT-H/14 (transformers CLIPModel): hub id, local folder, or "tiny".
    pickscore.model = "yuvalkirstain/PickScore_v1"
    # Processor (tokenizer + normalization) of PickScore: hub id or local folder.
    pickscore.processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    reward.clipscore = clipscore = ml_collections.ConfigDict()
    # CLIP (transformers CLIPModel) whose image-text cosine is the reward: hub id, local folder, or "tiny".
    clipscore.model = "openai/clip-vit-large-patch14"
    # Processor (tokenizer + normalization): hub id or local folder; unset means the model's own.
    clipscore.processor = config_dict.placeholder(str)

    reward.compressibility = compressibility = ml_collections.ConfigDict()
    # JPEG quality (1-100) of the differentiable size surrogate and of the logged true size `jpeg_kb`
    # (used by both `compressibility` and `incompressibility`).
    compressibility.quality = 95

    reward.object_count = object_count = ml_collections.ConfigDict()
    # Open-vocabulary detector (OWL-ViT or OWLv2 in transformers): hub id, local folder, or "tiny".
    object_count.model = "google/owlvit-base-patch32"
    # Processor (tokenizer + normalization) of the detector: hub id or local folder; unset means the model's own.
    object_count.processor = config_dict.placeholder(str)
    # Text query of the detector; "{}" is replaced by the metadata's `object`.
    object_count.query = "a photo of a {}"
    # A box counts when its probability exceeds this (0.1: the usual OWL-ViT post-processing threshold).
    object_count.threshold = 0.1
    # Softness of the count in logit units: sigmoid((logit − logit(threshold)) / temperature) per box.
    object_count.temperature = 0.25

    return config


def aesthetic():
    """The paper's aesthetic experiment: randomized truncation K ~ U[1, 50], effective batch 128."""
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


def aesthetic_hps():
    """A weighted sum of rewards on the HPSv2 prompts: aesthetic + 20 x HPSv2.

    HPSv2 moves ~20x less than the aesthetic score under training (about 0.25 -> 0.3 versus 5 -> 7), so a
    weight of 20 lets both pull on the LoRA about equally; change it to trade one off against the other.
    """
    config = hps()
    config.reward_fn = "aesthetic:1.0,hps:20.0"
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
    config.logdir = "logs/tiny"
    config.mixed_precision = "no"
    # No torch.compile on the CPU: minutes of compilation for a run of seconds.
    config.train.compile_unet = config.train.compile_grad_steps = config.train.compile_decoder = False
    config.pretrained.model = "tiny"
    # Every reward model tiny, so that `--config.reward_fn=NAME` (or a weighted sum) runs offline for any reward.
    config.reward.aesthetic.clip_model = "tiny"
    config.reward.hps.model = "tiny"
    config.reward.hps_v21.model = "tiny"
    config.reward.pickscore.model = "tiny"
    config.reward.clipscore.model = "tiny"
    config.reward.object_count.model = "tiny"
    config.sample.num_steps = 8
    config.sample.eval_batch_size = 4
    config.sample.num_eval_samples = 4
    config.train.batch_size_per_gpu = 2
    config.train.total_batch_size = 4
    config.train.total_samples_per_epoch = 8
    config.train.truncation = "uniform"
    config.train.k_min, config.train.k_max = 1, 8
    config.train.learning_rate = 3e-2
    # The random tiny reward has a tiny output scale; without this its gradients sit near Adam's eps.
    config.train.loss_coeff = 1.0
    config.num_epochs = 4
    config.save_freq = 2
    config.eval_freq = 0
    config.log_image_freq = 4
    return config


EXPERIMENTS = {
    "aesthetic": aesthetic,
    "aesthetic_k1": aesthetic_k1,
    "hps": hps,
    "hps_k1": hps_k1,
    "hps_v21": hps_v21,
    "compressibility": compressibility,
    "incompressibility": incompressibility,
    "object_count": object_count,
    "pickscore": pickscore,
    "aesthetic_hps": aesthetic_hps,
    "evaluate": evaluate,
    "tiny": tiny,
}


def get_config(name="aesthetic"):
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; valid: {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]()
