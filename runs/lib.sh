# Shared settings of the experiments, sourced by runs/*.sh.
# Every arm of an experiment trains on the same number of tokens (STEPS x BATCH x SEQ) drawn
# in the same order (the same seed); everything a run writes goes under $OUT (git-ignored).
# Each setting can be overridden from the environment, e.g. `STEPS=50 runs/balance.sh`;
# `PRESET=tiny STEPS=3 SEQ=32 OUT=/tmp/x DOCS=/tmp/x.md` smoke-tests the pipeline
# (/tmp/x.md: a copy of docs/experiments.md).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/out}
PRESET=${PRESET:-small}
VOCAB=$("$PY" -c "from dsmoe.config import ModelArgs; print(ModelArgs.from_preset('$PRESET').vocab_size)")
DATA=${DATA:-$OUT/data-$VOCAB}   # `dsmoe prepare` on the embedded corpus (en, fr, es, code, math)
STEPS=${STEPS:-500}
BATCH=${BATCH:-8}
SEQ=${SEQ:-128}
THREADS=${THREADS:-0}            # torch CPU threads; 0: torch's default
EVAL_BATCHES=${EVAL_BATCHES:-8}  # validation batches per domain (BATCH x SEQ tokens each)
GAMMA=${GAMMA:-0.01}              # bias update speed: DeepSeek's 0.001 barely moves the bias in a few hundred steps
REPORT_TOKENS=${REPORT_TOKENS:-8192}
DOCS=${DOCS:-docs/experiments.md} # where the results tables go (a smoke test points it elsewhere)

dsmoe() { "$PY" -m dsmoe "$@"; }
settings() { echo "PRESET=$PRESET STEPS=$STEPS BATCH=$BATCH SEQ=$SEQ GAMMA=$GAMMA THREADS=$THREADS"; }  # for the results' command line
experiment() { "$PY" runs/experiment.py "$@"; }

prepare_data() {
  [ -f "$DATA/manifest.json" ] || dsmoe prepare --out "$DATA" --vocab-size "$VOCAB"
}

# The training settings every arm shares, as a JSON object; extra "key": value pairs may follow.
train_settings() {
  local extra=${1:-}
  echo "{\"steps\": $STEPS, \"batch_size\": $BATCH, \"seq_len\": $SEQ, \"seed\": 0,
         \"warmup_steps\": $(( STEPS / 10 > 0 ? STEPS / 10 : 1 )), \"eval_interval\": 0,
         \"eval_batches\": $EVAL_BATCHES, \"ckpt_interval\": 0, \"gamma\": $GAMMA, \"threads\": $THREADS${extra:+, $extra}}"
}

# train_arm NAME MODEL_OVERRIDES TRAIN_EXTRA [--dense]: config then `dsmoe train` into
# $OUT/arms/NAME, skipped when done.
train_arm() {
  local name=$1 model=$2 extra=$3; shift 3
  local run=$OUT/arms/$name
  if [ -f "$run/hf/config.json" ]; then echo "$run: already trained"; return; fi
  rm -rf "$run"
  experiment config --preset "$PRESET" --model "$model" --train "$(train_settings "$extra")" \
    --out "$OUT/arms/$name.json" "$@"
  dsmoe train --config "$OUT/arms/$name.json" --data "$DATA" --out "$run" --no-progress
}

# arm NAME: train one of the arms the experiments share, by name; two experiments that use
# the same arm (the V3 recipe is the bias arm of (a) and the MTP arm of (c)) train it once.
arm() {
  case $1 in
    bias-mtp)    train_arm "$1" '{"n_mtp_layers": 1}' '"balance": "bias", "mtp_lambda": 0.3' ;;
    aux-mtp)     train_arm "$1" '{"n_mtp_layers": 1}' '"balance": "aux", "mtp_lambda": 0.3' ;;
    none-mtp)    train_arm "$1" '{"n_mtp_layers": 1}' '"balance": "none", "mtp_lambda": 0.3' ;;
    bias-nomtp)  train_arm "$1" '{"n_mtp_layers": 0}' '"balance": "bias"' ;;
    dense-nomtp) train_arm "$1" '{"n_mtp_layers": 0}' '' --dense ;;
    *) echo "unknown arm $1" >&2; return 1 ;;
  esac
}

report_arm() {
  [ -f "$OUT/arms/$1/report/report.json" ] || dsmoe report --model "$OUT/arms/$1/hf" --data "$DATA" \
    --out "$OUT/arms/$1/report" --seq-len "$SEQ" --tokens-per-domain "$REPORT_TOKENS"
}
