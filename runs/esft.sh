#!/usr/bin/env bash
# Expert-specialised fine-tuning on the math domain against full fine-tuning with the same
# budget, starting from the `small` base of runs/life_base.sh. Figures: docs/training-life.md.
#   runs/esft.sh [BASE_MODEL_DIR] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${1:-out/life/base}
OUT=${2:-out/life}
.venv/bin/python -m dsmoe esft --model "$BASE" --out "$OUT/esft" --task math --share 0.2 \
    --score gate --steps 150 --batch-size 8 --seq-len 256 --lr 1e-3 --eval-rows 32 --threads "${THREADS:-0}"
