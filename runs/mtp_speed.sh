#!/usr/bin/env bash
# MTP speculation that pays: train `small` with one MTP module (lambda 0.3, bias balancing),
# sized to finish in about 20 minutes on a 2-core CPU with one torch thread (800 steps x 8 x
# 128 tokens; the `bias-mtp` arm of runs/mtp.sh trains 500 steps in 10.8 min), then measure
# greedy draft acceptance on validation prompts and the decode speed of speculative against
# plain decoding (bench/decode_fast.py --model). Everything goes under $OUT/arms/mtp-speed.
# A shorter run of the same recipe: `STEPS=300 runs/mtp_speed.sh`.
STEPS=${STEPS:-800}
THREADS=${THREADS:-1}
source "$(dirname "$0")/lib.sh"
prepare_data
train_arm mtp-speed '{"n_mtp_layers": 1}' '"balance": "bias", "mtp_lambda": 0.3'
[ -f "$OUT/arms/mtp-speed/acceptance.json" ] || experiment acceptance --model "$OUT/arms/mtp-speed/hf" \
  --data "$DATA" --out "$OUT/arms/mtp-speed/acceptance.json"
cat "$OUT/arms/mtp-speed/acceptance.json"
"$PY" bench/decode_fast.py --only speculative --model "$OUT/arms/mtp-speed/hf"
