#!/usr/bin/env bash
# SFT on the built-in demo chats, then GRPO on generated math problems, starting from the
# `small` base of runs/life_base.sh. Figures: docs/training-life.md.
#   runs/sft_grpo.sh [BASE_MODEL_DIR] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${1:-out/life/base}
OUT=${2:-out/life}
DSMOE=".venv/bin/python -m dsmoe"
$DSMOE sft --model "$BASE" --out "$OUT/sft" --data demo --demo-size 6000 --math-difficulty 1 \
    --steps 500 --batch-size 8 --seq-len 256 --lr 1e-3 --eval-math 200 --max-new-tokens 96 --threads 1
# GRPO on the five problem kinds the SFT model solves at least sometimes (greedy 5-25%);
# on addition, ages and distance it scores 0, and a group with no success carries no signal.
$DSMOE grpo --model "$OUT/sft" --out "$OUT/grpo" --iterations 60 --prompts 16 --group-size 8 \
    --max-new-tokens 96 --temperature 0.7 --lr 5e-5 --beta 0.04 --difficulty 1 \
    --kinds subtraction,multiplication,division,equation,shopping \
    --eval-problems 200 --eval-samples 4 --threads 1
