#!/usr/bin/env bash
# Train a model on long documents, extend its context, and evaluate it at length (issue 21):
#
#   bash bench/suite_eval_gpu.sh            # on one GPU: Llama-3.2-1B body, byte vocabulary
#   CONFIG=tiny-llama SEQ_SHORT=512 SEQ_LONG=2048 SEQ_EVAL2=4096 STEPS_A=30 STEPS_B=4 \
#     EVERY_A=10 SAVE_DIR=/tmp/x bash bench/suite_eval_gpu.sh      # the same path on a CPU, in a minute
#
# 1. corpus: every Python package directory on this machine's sys.path, its .py files concatenated
#    into one document (up to CORPUS_MB, default 64) (long documents with real long-range structure: names defined in one file are
#    used in the next); `longtrain data prepare` keeps those of at least SEQ_SHORT bytes.
# 2. train STEPS_A steps at SEQ_SHORT tokens, checkpoint every EVERY_A steps with blocking staging,
#    then EVERY_A more steps with background staging (the throughput of the windows after each save
#    is the asynchronous-save cost, read from metrics.jsonl);
# 3. context extension: resume at SEQ_LONG with llama3 RoPE scaling (SEQ_LONG / SEQ_SHORT), STEPS_B steps;
# 4. `longtrain eval` at SEQ_LONG and at SEQ_EVAL2 (past the trained length): loss by position,
#    passkey grid; JSON and PNG plots are copied to $OUT (or ./eval-out).
set -euo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
CONFIG=${CONFIG:-llama3.2-1b}
SEQ_SHORT=${SEQ_SHORT:-16384}
SEQ_LONG=${SEQ_LONG:-131072}
SEQ_EVAL2=${SEQ_EVAL2:-262144}
STEPS_A=${STEPS_A:-240}
EVERY_A=${EVERY_A:-80}
STEPS_B=${STEPS_B:-6}
LR=${LR:-3e-4}
WORK=${WORK:-/tmp/lt-eval}
SAVE_DIR=${SAVE_DIR:-$WORK/ckpt}
DEST=${OUT:-$PWD/eval-out}
EXTRA=${EXTRA:-}
mkdir -p "$WORK" "$DEST"
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }

stamp "corpus"
python3 - "$WORK/corpus" "${CORPUS_MB:-64}" <<'EOF'
import pathlib, sys
out = pathlib.Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
n, total, cap = 0, 0, float(sys.argv[2]) * 2**20
for root in {pathlib.Path(p) for p in sys.path if p.endswith("-packages") or p.endswith("python3.12")}:
    if not root.is_dir():
        continue
    for d in sorted(p for p in root.rglob("*") if p.is_dir() and "__pycache__" not in p.parts):
        files = sorted(d.glob("*.py"))
        text = "".join(f"# file: {f.name}\n" + f.read_text(errors="replace") for f in files)
        if len(text) >= 4096 and total < cap:
            (out / f"{n:05d}.txt").write_text(text)
            n, total = n + 1, total + len(text)
print(f"{n} documents, {total / 2**20:.0f} MB")
EOF
python3 -m longtrain data prepare "$WORK/corpus" --out "$WORK/shards" --min-length "$SEQ_SHORT" --workers 8 --no-progress

COMMON="data.source=shards data.path=$WORK/shards model.vocab_size=264 optim.lr=$LR schedule.warmup_steps=20
  schedule.eval_every=0 logging.run_dir=$WORK/run logging.log_every=10 logging.progress=false
  checkpoint.dir=$SAVE_DIR checkpoint.keep_last=1 data.on_order_change=continue $EXTRA"
stamp "train $STEPS_A steps at $SEQ_SHORT (blocking staging, save every $EVERY_A)"
python3 -m longtrain train "$CONFIG" $COMMON data.seq_len=$SEQ_SHORT schedule.steps=$STEPS_A \
  checkpoint.every_steps=$EVERY_A checkpoint.staging=blocking
cp "$WORK/run/metrics.jsonl" "$DEST/train-metrics.jsonl"
STEPS_A2=$STEPS_A
if [ "${BACKGROUND_STAGING:-1}" = 1 ]; then
  STEPS_A2=$((STEPS_A + EVERY_A))
  stamp "train to $STEPS_A2 at $SEQ_SHORT (background staging, save every $((EVERY_A / 2)))"
  python3 -m longtrain train "$CONFIG" $COMMON data.seq_len=$SEQ_SHORT schedule.steps=$STEPS_A2 \
    checkpoint.every_steps=$((EVERY_A / 2)) checkpoint.staging=background
  cp "$WORK/run/metrics.jsonl" "$DEST/train-metrics.jsonl"
fi
FACTOR=$((SEQ_LONG / SEQ_SHORT))
ROPE="model.rope_scaling.type=llama3 model.rope_scaling.factor=$FACTOR model.rope_scaling.original_max_position=$SEQ_SHORT"
stamp "context extension: $STEPS_B steps at $SEQ_LONG, llama3 RoPE scaling x$FACTOR"
python3 -m longtrain train "$CONFIG" $COMMON $ROPE data.seq_len=$SEQ_LONG schedule.steps=$((STEPS_A2 + STEPS_B)) \
  schedule.warmup_steps=0 checkpoint.every_steps=0
cp "$WORK/run/metrics.jsonl" "$DEST/train-metrics.jsonl"
Q=$((SEQ_LONG / 8)); H=$((SEQ_LONG / 2))
stamp "eval at $SEQ_LONG"
python3 -m longtrain eval "$WORK/run" $ROPE data.seq_len=$SEQ_LONG eval.batches=2 eval.passkey_trials=2 \
  "eval.passkey_lengths=[$Q,$H,$SEQ_LONG]"
for f in "$WORK"/run/eval/step-*; do mv "$f" "$DEST/len$SEQ_LONG-$(basename "$f")"; done
stamp "eval at $SEQ_EVAL2 (past the trained length)"
python3 -m longtrain eval "$WORK/run" $ROPE data.seq_len=$SEQ_EVAL2 eval.batches=1 eval.passkey_trials=1 \
  "eval.passkey_lengths=[$SEQ_EVAL2]"
for f in "$WORK"/run/eval/step-*; do mv "$f" "$DEST/len$SEQ_EVAL2-$(basename "$f")"; done
stamp "done"
ls -la "$DEST"
