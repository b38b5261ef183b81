#!/usr/bin/env bash
# Launch one named experiment of config/align_prop.py on every visible GPU (CUDA_VISIBLE_DEVICES is
# respected); the same effective batch on any GPU count through gradient accumulation.
#   scripts/launch.sh EXPERIMENT [--config.key=value ...]
# MIXED_PRECISION (auto, no, fp16 or bf16), when set, is passed to accelerate and to the config alike; unset, the
# experiment's own config.mixed_precision holds (the base default "auto": bf16 on a GPU that has it).
# One GPU (or none): the script runs directly, so its message and exit code are the user's. Several: the config
# is checked for that many processes first (one message, nothing loaded), then accelerate launches them.
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1
shift
num_gpus=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
args=(--config "config/align_prop.py:$name")
if [ -n "${MIXED_PRECISION:-}" ]; then args+=(--config.mixed_precision="$MIXED_PRECISION"); fi
args+=("$@")
if [ "$num_gpus" -eq 1 ]; then
  exec python scripts/train.py "${args[@]}"
fi
python scripts/train.py "${args[@]}" --check "$num_gpus"
exec accelerate launch --num_processes "$num_gpus" --num_machines 1 --multi_gpu \
  ${MIXED_PRECISION:+--mixed_precision "$MIXED_PRECISION"} --dynamo_backend no scripts/train.py "${args[@]}"
