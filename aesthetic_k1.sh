#!/usr/bin/env bash
# AlignProp, experiment 'aesthetic_k1' of config/align_prop.py, on all visible GPUs. Extra arguments are
# forwarded to scripts/train.py, e.g.  bash aesthetic_k1.sh --config.train.learning_rate=5e-4
exec "$(dirname "$0")/scripts/launch.sh" aesthetic_k1 "$@"
