#!/usr/bin/env bash
# (a) Balancing: DeepSeek-V3's auxiliary-loss-free bias against the classic auxiliary loss
# and against no balancing, on equal tokens: MaxVio and validation loss.
source "$(dirname "$0")/lib.sh"
prepare_data
for arm in bias aux none; do
  train_arm "balance/$arm" '{}' "\"balance\": \"$arm\""
  report_arm "balance/$arm"
done
experiment results balance bias aux none --out-dir "$OUT" --command "$(settings) runs/balance.sh" --docs "$DOCS"
