#!/usr/bin/env bash
# (a) Balancing: DeepSeek-V3's auxiliary-loss-free bias against the classic auxiliary loss
# and against no balancing, on equal tokens: MaxVio and validation loss. MTP is on in all
# three (the V3 recipe), so only the balancing differs.
source "$(dirname "$0")/lib.sh"
prepare_data
for balance in bias aux none; do
  arm "$balance-mtp"
  report_arm "$balance-mtp"
done
experiment results balance bias=bias-mtp aux=aux-mtp none=none-mtp --out-dir "$OUT" \
  --command "$(settings) runs/balance.sh" --docs "$DOCS"
