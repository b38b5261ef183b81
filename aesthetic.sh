#!/usr/bin/env bash
# AlignProp, experiment 'aesthetic' of config/align_prop.py, on all visible GPUs. Extra arguments are
# forwarded to scripts/train.py, e.g.  bash aesthetic.sh --config.train.learning_rate=5e-4
exec "$(dirname "$0")/scripts/launch.sh" aesthetic "$@"
