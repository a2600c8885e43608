#!/usr/bin/env bash
# (d) YaRN: extend the model trained at SEQ positions to FACTOR x SEQ, with and without a
# short fine-tune at the new length; validation perplexity by position before and after.
# The base is the V3-recipe arm (bias balancing, MTP) of runs/balance.sh and runs/mtp.sh.
source "$(dirname "$0")/lib.sh"
FACTOR=${FACTOR:-4}
FT_STEPS=${FT_STEPS:-$(( STEPS / 10 > 0 ? STEPS / 10 : 1 ))}
FT_BATCH=${FT_BATCH:-4}
LONG=$(( FACTOR * SEQ ))
prepare_data
arm bias-mtp
mkdir -p "$OUT/yarn"
[ -f "$OUT/yarn/yarn-0/config.json" ] || experiment yarn --model "$OUT/arms/bias-mtp/hf" --data "$DATA" \
  --factor "$FACTOR" --original-seq-len "$SEQ" --steps 0 --out "$OUT/yarn/yarn-0"
[ -f "$OUT/yarn/yarn-ft/config.json" ] || experiment yarn --model "$OUT/arms/bias-mtp/hf" --data "$DATA" \
  --factor "$FACTOR" --original-seq-len "$SEQ" --steps "$FT_STEPS" --batch-size "$FT_BATCH" \
  --threads "$THREADS" --out "$OUT/yarn/yarn-ft"
experiment position-loss --model "$OUT/arms/bias-mtp/hf" --data "$DATA" --seq-len "$LONG" --out "$OUT/yarn/base.json"
experiment position-loss --model "$OUT/yarn/yarn-0" --data "$DATA" --seq-len "$LONG" --out "$OUT/yarn/yarn-0.json"
experiment position-loss --model "$OUT/yarn/yarn-ft" --data "$DATA" --seq-len "$LONG" --out "$OUT/yarn/yarn-ft.json"
experiment results yarn base yarn-0 yarn-ft --out-dir "$OUT" --command "$(settings) FACTOR=$FACTOR FT_STEPS=$FT_STEPS FT_BATCH=$FT_BATCH runs/yarn.sh" --docs "$DOCS"
