#!/usr/bin/env bash
# (c) Multi-token prediction on (depth 1, lambda 0.3) and off, on equal tokens: the main
# head's validation loss, and how often greedy self-speculative decoding accepts the draft.
source "$(dirname "$0")/lib.sh"
prepare_data
train_arm mtp/mtp '{"n_mtp_layers": 1}' '"mtp_lambda": 0.3'
train_arm mtp/nomtp '{"n_mtp_layers": 0}' ''
experiment acceptance --model "$OUT/mtp/mtp/hf" --data "$DATA" --out "$OUT/mtp/mtp/acceptance.json"
experiment results mtp mtp nomtp --out-dir "$OUT" --command "$(settings) runs/mtp.sh" --docs "$DOCS"
