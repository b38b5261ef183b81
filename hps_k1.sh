#!/usr/bin/env bash
# AlignProp, experiment 'hps_k1' of config/align_prop.py, on all visible GPUs. Extra arguments are
# forwarded to scripts/train.py, e.g.  bash hps_k1.sh --config.train.learning_rate=5e-4
exec "$(dirname "$0")/scripts/launch.sh" hps_k1 "$@"
