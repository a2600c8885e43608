#!/usr/bin/env bash
# (b) MoE against a dense model with the same activated parameters per token (every layer a
# SwiGLU FFN whose width makes the totals match), on equal tokens: validation loss.
# MTP is off in both arms so that only the FFN differs.
source "$(dirname "$0")/lib.sh"
prepare_data
arm bias-nomtp
arm dense-nomtp
experiment results dense MoE=bias-nomtp dense=dense-nomtp --out-dir "$OUT" \
  --command "$(settings) runs/dense.sh" --docs "$DOCS"
