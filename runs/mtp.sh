#!/usr/bin/env bash
# (c) Multi-token prediction on (depth 1, lambda 0.3) and off, on equal tokens: the main
# head's validation loss, and how often greedy self-speculative decoding accepts the draft.
source "$(dirname "$0")/lib.sh"
prepare_data
arm bias-mtp
arm bias-nomtp
[ -f "$OUT/arms/bias-mtp/acceptance.json" ] || experiment acceptance --model "$OUT/arms/bias-mtp/hf" \
  --data "$DATA" --out "$OUT/arms/bias-mtp/acceptance.json"
experiment results mtp "MTP on=bias-mtp" "MTP off=bias-nomtp" --out-dir "$OUT" \
  --command "$(settings) runs/mtp.sh" --docs "$DOCS"
