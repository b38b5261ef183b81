"""Every config key, declared once with what it means: `base()`. Experiments are in config/align_prop.py.

    python scripts/train.py --config config/align_prop.py:tiny --config.train.learning_rate=3e-2
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
    # Precision of the frozen weights and autocast: "auto", "no" (fp32), "fp16" or "bf16". LoRA stays fp32.
    # "auto": bf16 on a GPU that has it, else fp16 on a GPU, fp32 on the CPU (why: alignprop.speed.auto_precision).
    # The paper's setting: "fp16".
    config.mixed_precision = "auto"
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
    # Reward to maximize: a name, or a weighted sum "name:weight,name:weight" (alignprop/rewards/__init__.py).
    config.reward_fn = "aesthetic"
    # Training prompt set (registry name, or "from_file:PATH" with one prompt per line; alignprop/prompts.py).
    config.prompt_fn = "simple_animals"
    # Evaluation prompt set (unseen prompts).
    config.eval_prompt_fn = "eval_simple_animals"
    # Held-out rewards scored on the evaluation images only, beside the trained one, to watch for reward hacking
    # (e.g. train HPS, watch "aesthetic,pickscore"); names as in reward_fn, logged as eval/heldout/<name>_mean.
    config.eval_rewards = ""
    # Experiment trackers: "none", "wandb" or "tensorboard" (metrics.jsonl is always written).
    config.log_with = "none"
    # wandb/tensorboard project name.
    config.project_name = "alignprop"
    # Save (and send to the trackers) a grid of training samples every this many optimizer steps (0: never).
    config.log_image_freq = 10

    config.model = model = ml_collections.ConfigDict()
    # Model family (alignprop/families): "sd" (Stable Diffusion 1.x and 2.x), "sdxl" (Stable Diffusion XL),
    # "sd3" (Stable Diffusion 3 and 3.5), "flux" (FLUX.1 dev and schnell).
    model.family = "sd"
    # Where the weights come from: a hub id, a local diffusers folder, a single .safetensors/.ckpt file,
    # "tiny[:variant]" (tiny random models, offline; sd: tiny:sd1, tiny:sd2 (v-prediction), tiny:sd2-base;
    # sdxl: tiny:sdxl; sd3: tiny:sd35, tiny:sd3; flux: tiny:dev, tiny:schnell) or "random:<size>" (the
    # full-size architecture with seeded random weights, nothing downloaded: the compute and memory of the real
    # run; sd: random:sd15, random:sd21, random:sd2-base; sdxl: random:sdxl; sd3: random:sd35m, random:sd35l,
    # random:sd3m; flux: random:flux-dev, random:flux-schnell).
    # (SD 1.5: runwayml/stable-diffusion-v1-5 was taken down in 2024; this is the mirror diffusers documents.)
    model.source = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    # Hub revision (branch, tag or commit) of the model.
    model.revision = "main"
    # What the denoiser predicts, "epsilon" or "v_prediction"; unset: the checkpoint's scheduler config says.
    model.prediction_type = config_dict.placeholder(str)
    # sd3/flux: T5 tokens every prompt is padded or truncated to (unset: the pipeline's default, 256 for
    # SD3/3.5 and 512 for FLUX.1; at most 512). The padding is attended, so it changes the embedding.
    model.max_sequence_length = config_dict.placeholder(int)
    # sd3 only: False drops T5-XXL (never loaded; its part of the prompt embedding is zeros, as diffusers'
    # text_encoder_3=None): 8.9 GiB less in bf16, weaker prompt following.
    model.use_t5 = True
    # sd3/flux: keep the text encoders in CPU memory and move them to the GPU only to encode a prompt batch
    # (T5-XXL: 8.9 GiB of GPU memory freed for the rollout, ~2 x 9 GB of host-device copies per encoding).
    model.offload_text_encoders = False
    # sd3/flux: keep each prompt's embeddings in CPU memory after its first encoding (each prompt encoded
    # alone); once every prompt of the set has been seen the text encoders stop running (with the offload,
    # they stop moving). CPU memory: ~2.7 MB per prompt for SD3 (333 x 4096 bf16), ~4 MB for FLUX (512 tokens).
    model.cache_prompt_embeddings = False
    # sd3/flux, with the cache: encode every prompt of the training and evaluation sets at start-up, in one visit
    # of the (offloaded) text encoders, so that no training step moves or runs them (measured on an H200 for
    # SD3.5 medium: a step that meets a new prompt took ~7 s longer with the offload, and the encoders' visit set
    # the step's peak memory). Skipped, with a warning, where the embeddings would exceed this many GiB of
    # CPU memory in each process (then each prompt is encoded when first drawn, as without this key; 0: never
    # precompute). Every process keeps its own cache: on one host, N GPUs hold N copies.
    model.precompute_prompt_embeddings_max_gib = 16.0
    # Another VAE in place of the checkpoint's: a hub id or local folder of an AutoencoderKL, e.g.
    # "madebyollin/sdxl-vae-fp16-fix" (SDXL's VAE overflows in fp16; this one does not). "": the checkpoint's.
    model.vae = ""
    # The VAE's dtype: "auto" (as the family's pipeline decodes: the inference dtype, but fp32 under fp16 for
    # SDXL's VAE, whose config asks for it with force_upcast), "fp32", "fp16" or "bf16".
    model.vae_dtype = "auto"

    config.sample = sample = ml_collections.ConfigDict()
    # DDIM steps of every rollout (T).
    sample.num_steps = 50
    # Classifier-free guidance weight (<= 1 disables guidance).
    sample.guidance_scale = 7.5
    # Guidance rescale (Lin et al. 2023, arXiv 2305.08891): 0 is plain CFG; ~0.7 for v-prediction models.
    sample.guidance_rescale = 0.0
    # DDIM eta: 0 is deterministic DDIM, 1 is DDPM-like.
    sample.eta = 0.0
    # Image size in pixels, any aspect ratio (default: the model's native size, 512 for SD 1.5, 1024 for SDXL).
    # A multiple of 8 (the VAE factor).
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
    # fp16 only: the GradScaler's initial loss scale (accelerate's default, 2**16). Too low a scale lets small
    # gradients underflow to zero in the fp16 backward: measure it with `scripts/benchmark.py --underflow K`.
    train.grad_scale_init = 65536.0
    # Loss = loss_coeff x (−mean reward, or |reward − reward.target|).
    train.loss_coeff = 0.01
    # Where gradients flow through the chain (alignprop/methods.py): "alignprop" (the last K steps, K from
    # `truncation` below), "draft_k" (the last train.k steps: truncation "fixed"), "draft_lv" (K=1 over
    # `lv_copies` re-noised copies of the last step), "refl" (one step s of the last `stop_last`, the reward on
    # its predicted clean sample), "drtune" (`drtune_k` spaced steps of 0..s, inputs detached, reward at s).
    train.method = "alignprop"
    # DRaFT-LV: copies of the last step (n; the paper's 2). Each copy is one more decode and reward pass.
    train.lv_copies = 2
    # ReFL and DRTune: the step s whose predicted clean sample the reward sees is drawn from the last this many.
    train.stop_last = 10
    # DRTune: the number of (evenly spaced) steps of 0..s that keep gradients.
    train.drtune_k = 3
    # DRaFT+'s penalty: this times the mean squared distance of the fine-tuned and base predictions on the same
    # inputs at the grad steps, added to the loss (0: off; logged as `kl`).
    train.kl_coeff = 0.0
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

    config.speed = speed = ml_collections.ConfigDict()
    # What makes a step fast or light (alignprop/speed.py; measured in BENCHMARKS.md). None of it changes
    # what is computed, but fp8_prefix (opt-in: it changes the sampled images slightly).
    # Allow TF32 matmuls and convolutions on Ampere+ GPUs (faster, slightly less precise).
    speed.tf32 = True
    # Let scaled_dot_product_attention use cuDNN's attention kernels (the others: flash, memory-efficient, math).
    # On an H200 (torch 2.11) cuDNN's attention backward failed at FLUX.1-dev's shapes (1024 px: 4096 + 512
    # tokens, 24 heads of 128): "mha_graph.execute(...) is_good()", also in diffusers' own loop; the FLUX
    # experiments switch it off.
    speed.cudnn_attention = True
    # torch.compile the denoiser (steps with and without gradients, forward and backward) and the VAE
    # decoder. The first step compiles (about 4-5 minutes at SD 1.5 size), then a step is ~1.6x faster and
    # lighter. Skipped on the CPU.
    speed.compile = True
    # What is compiled: "model" (the denoiser and the decoder each as one graph) or "blocks" (only their repeated
    # blocks, e.g. a UNet's transformer and resnet blocks, each class traced once per shape and reused: regional
    # compilation, a much shorter first step; BENCHMARKS.md has both).
    speed.compile_scope = "model"
    # Keep the compiled kernels between runs (torch.compile's portable cache artifacts): "auto" (a file per run
    # shape under ~/.cache/alignprop/compile, or $XDG_CACHE_HOME), a file path, or "off". Saved after the first
    # optimizer step, loaded at start-up: a second run, a resume or an evaluation of the same shapes starts warm.
    speed.compile_cache = "auto"
    # The checkpoint plan from the memory the run may use (alignprop/memory.py): "off" (checkpoint_blocks and
    # uncheckpointed_steps below as written: the low-memory plan), "auto" (what the GPU has free at start-up, less a
    # margin) or a number of GiB. At start-up one grad call, one decode and the reward are measured on the card, and
    # the plan with the fewest denoiser forwards predicted to fit is used and printed. Off by default until its
    # compiled K=50 step is measured (BENCHMARKS.md: at 15 GiB, eager, it predicted 12.7 GiB and peaked at 11.4).
    speed.memory_budget_gib = "off"
    # Recompute each grad step's denoiser call in backward instead of storing its activations...
    speed.checkpoint_grad_steps = True
    # ...except the last this many grad steps (one forward less per step, one call's activations more).
    speed.uncheckpointed_steps = 1
    # Also checkpoint inside the denoiser's blocks (diffusers' own): peak memory independent of the grad
    # steps' activations (15.5 -> 7.5 GiB at batch 4 on an H100, eager), one more forward per grad step.
    speed.checkpoint_blocks = True
    # Decode latents in chunks of this many images (0: all at once), each chunk recomputed in backward if...
    speed.decode_chunk = 1
    # ...the VAE decoder is checkpointed (its activations are the largest memory item).
    speed.checkpoint_decode = True
    # Also checkpoint inside the VAE decoder (diffusers' own: its mid block and each up block recomputed in
    # backward): the decoder's backward then holds one block's activations, not all of them (SDXL's decoder at
    # 1024 px, bf16: 6.1 instead of 11.6 GiB, estimated), for one more decoder forward per image.
    speed.checkpoint_vae_blocks = False
    # Recompute the reward model in backward instead of storing its activations.
    speed.checkpoint_reward = False
    # Run the denoiser's Linear layers in float8 (e4m3, per-token and per-channel scales) in a training rollout's
    # steps without gradients (the sampling before the last K steps: 49 of 50 calls at K=1), on GPUs with float8
    # matmuls (Ada, Hopper, Blackwell). The grad steps, evaluation and the KL penalty's reference stay exact; the
    # sampled images differ slightly (BENCHMARKS.md measures by how much, against fp16's own difference from bf16).
    speed.fp8_prefix = False

    config.lora = lora = ml_collections.ConfigDict()
    # LoRA rank and alpha (scale = alpha / rank).
    lora.rank = 4
    lora.alpha = 4.0
    # Modules that get LoRA (peft target_modules); unset: the family's (for sd the paper's to_q/to_k/to_v/
    # to_out.0 of every attention block).
    lora.targets = config_dict.placeholder(tuple)

    config.reward = reward = ml_collections.ConfigDict()
    # If set, loss is |reward − target| instead of −reward.
    reward.target = config_dict.placeholder(float)
    reward.aesthetic = aesthetic = ml_collections.ConfigDict()
    # CLIP image tower: hub id, local folder, "tiny" (tiny random tower and MLP), or "random" (CLIP ViT-L/14's
    # architecture and the MLP with seeded random weights; nothing downloaded).
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
    # Local path of the checkpoint; overrides the hub download. "random": seeded random weights, nothing read.
    hps.path = config_dict.placeholder(str)
    reward.hps_v21 = hps_v21 = ml_collections.ConfigDict()
    # HPSv2.1: same architecture, retrained weights; keys as in `reward.hps`.
    hps_v21.model = "ViT-H-14"
    # Hub repo and file of the HPSv2.1 checkpoint.
    hps_v21.repo = "xswu/HPSv2"
    hps_v21.file = "HPS_v2.1_compressed.pt"
    # Local path of the checkpoint ("random": seeded random weights); overrides the hub download.
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

    reward.imagereward = imagereward = ml_collections.ConfigDict()
    # ImageReward v1.0 (BLIP ViT-L/16 + BERT): "ImageReward-v1.0" (the official architecture) or "tiny" (tiny random
    # towers, offline).
    imagereward.model = "ImageReward-v1.0"
    # Hub repo and file of the official state dict.
    imagereward.repo = "THUDM/ImageReward"
    imagereward.file = "ImageReward.pt"
    # Local path of the state dict; overrides the hub download.
    imagereward.path = config_dict.placeholder(str)
    # Tokenizer (hub id or folder) of the prompts: BLIP's, bert-base-uncased.
    imagereward.tokenizer = "google-bert/bert-base-uncased"

    reward.mps = mps = ml_collections.ConfigDict()
    # MPS (overall): "MPS-overall" (CLIP ViT-H/14 + MPS's cross model) or "tiny" (tiny random towers, offline).
    mps.model = "MPS-overall"
    # Hub repo and file of a copy of the checkpoint (the official MPS_overall_checkpoint.pth is published through
    # the Kwai-Kolors/MPS README, not on the hub: download it and set `path`).
    mps.repo = ""
    mps.file = "MPS_overall_checkpoint.pth"
    # Local path of the checkpoint (the official pickled model, a state dict, or .safetensors).
    mps.path = config_dict.placeholder(str)
    # Processor (tokenizer + normalization) of MPS: hub id or local folder.
    mps.processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

    reward.hpsv3 = hpsv3 = ml_collections.ConfigDict()
    # HPSv3: "HPSv3" (Qwen2-VL-7B-Instruct + the official reward head) or "tiny" (a tiny random Qwen2-VL, offline).
    hpsv3.model = "HPSv3"
    # Hub repo and file of the official checkpoint (about 16 GB, bf16).
    hpsv3.repo = "MizzenAI/HPSv3"
    hpsv3.file = "HPSv3.safetensors"
    # Local path of the checkpoint (.safetensors or a state dict); overrides the hub download.
    hpsv3.path = config_dict.placeholder(str)
    # The backbone whose config, tokenizer and image normalization HPSv3 uses: hub id or local folder.
    hpsv3.backbone = "Qwen/Qwen2-VL-7B-Instruct"
    # Pixel budget of the resized image (a multiple of 28 per side, Qwen2-VL's smart_resize); the official
    # inference uses 256 x 28 x 28 for both (256 image tokens).
    hpsv3.min_pixels = 200704
    hpsv3.max_pixels = 200704

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
    # Duplicates: a box overlapping a better detected box by IoU above this is not counted (greedy NMS, soft in the
    # scores); 1.0 counts every box (GenEval's default `max_overlap`).
    object_count.nms_iou = 0.5
    # Weight of the rank hinge's gradient (the best `count` distinct boxes above the threshold, the rest below): an
    # object with no box near the threshold still gets a slope of this much per logit. 0: the sigmoid count's alone.
    object_count.rank_weight = 0.1

    return config
