#!/usr/bin/env bash
# Grow the `small` base of runs/life_base.sh by 8 routed experts per MoE layer (2 per group) and
# train them on a domain it never saw: C++ (the c10/util headers that ship with PyTorch,
# BSD-3-Clause), old experts frozen; the same training without new experts for comparison.
# Figures: docs/training-life.md.
#   runs/expand.sh [BASE_MODEL_DIR] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${1:-out/life/base}
OUT=${2:-out/life}
PY=.venv/bin/python
mkdir -p "$OUT"
$PY - "$OUT/cpp.jsonl" <<'PY'
import glob, json, os, sys
import torch
root = os.path.join(os.path.dirname(torch.__file__), "include", "c10", "util")
with open(sys.argv[1], "w") as f:
    for path in sorted(glob.glob(os.path.join(root, "*.h"))):
        f.write(json.dumps({"text": open(path, encoding="utf-8").read(), "domain": "cpp"}) + "\n")
PY
$PY -m dsmoe expand --model "$BASE" --out "$OUT/expand" --data "$OUT/cpp.jsonl" --add 8 \
    --init copy --steps 150 --batch-size 8 --seq-len 256 --lr 1e-3 --eval-rows 32 --compare --threads "${THREADS:-0}"
