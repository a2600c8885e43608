#!/usr/bin/env bash
# (d) YaRN: extend the model trained at SEQ positions to FACTOR x SEQ, with and without a
# short fine-tune at the new length; validation perplexity by position before and after.
# Control: the same fine-tune with plain RoPE (plain-ft), which separates what YaRN does
# from what the extra training tokens do.
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
[ -f "$OUT/yarn/plain-ft/config.json" ] || experiment yarn --model "$OUT/arms/bias-mtp/hf" --data "$DATA" \
  --factor "$FACTOR" --original-seq-len "$SEQ" --steps "$FT_STEPS" --batch-size "$FT_BATCH" \
  --threads "$THREADS" --plain --out "$OUT/yarn/plain-ft"
position_loss() {  # position_loss NAME MODEL_DIR: loss by position over LONG-token windows
  [ -f "$OUT/yarn/$1.json" ] || experiment position-loss --model "$2" --data "$DATA" --seq-len "$LONG" \
    --out "$OUT/yarn/$1.json"
}
position_loss base "$OUT/arms/bias-mtp/hf"
for name in yarn-0 plain-ft yarn-ft; do position_loss "$name" "$OUT/yarn/$name"; done
experiment results yarn base yarn-0 plain-ft yarn-ft --out-dir "$OUT" --command "$(settings) FACTOR=$FACTOR FT_STEPS=$FT_STEPS FT_BATCH=$FT_BATCH runs/yarn.sh" --docs "$DOCS"
