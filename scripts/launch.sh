#!/usr/bin/env bash
# Launch one named experiment of config/align_prop.py on every visible GPU (CUDA_VISIBLE_DEVICES is
# respected); the same effective batch on any GPU count through gradient accumulation.
#   scripts/launch.sh EXPERIMENT [--config.key=value ...]
# MIXED_PRECISION (fp16 by default; bf16 or no) is passed to accelerate and to the config alike.
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1
shift
num_gpus=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
mixed_precision=${MIXED_PRECISION:-fp16}
multi=()
if [ "$num_gpus" -gt 1 ]; then multi=(--multi_gpu); fi
exec accelerate launch --num_processes "$num_gpus" --num_machines 1 "${multi[@]}" \
  --mixed_precision "$mixed_precision" --dynamo_backend no \
  scripts/train.py --config "config/align_prop.py:$name" --config.mixed_precision="$mixed_precision" "$@"
