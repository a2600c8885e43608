#!/usr/bin/env bash
# The `small` base model the training-life runs start from (runs/sft_grpo.sh, runs/esft.sh,
# runs/expand.sh): 400 steps of 16 x 128 tokens (819,200 tokens) on the embedded corpus,
# settings in runs/life_base.json. Writes OUT_DIR/base (a Hugging Face checkpoint folder).
#   runs/life_base.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/life}
PY=.venv/bin/python
[ -f out/data/manifest.json ] || $PY -m dsmoe prepare --out out/data
$PY -m dsmoe train --config runs/life_base.json --data out/data --out "$OUT/base-run" --no-progress
rm -rf "$OUT/base" && cp -r "$OUT/base-run/hf" "$OUT/base"
