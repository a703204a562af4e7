#!/usr/bin/env bash
# One GPU, Llama-3.2-1B: one process in bf16 (FSDP2 on a one-rank mesh: bf16 weights and residual
# stream, the default) against parallel.param_dtype=fp32 (fp32 weights under bf16 autocast, the
# old one-GPU behaviour) under the same manual policy, then the planner's pick for the default.
#   bash bench/suite_one_rank.sh [SEQ_LEN=128K]      JSON per run under $OUT (or /tmp)
set -uo pipefail
out=${OUT:-/tmp}; L=${1:-128K}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
run() {
  name=$1; shift
  torchrun --standalone --nproc_per_node=1 bench/bench_train.py --config llama3.2-1b --seq-len "$L" \
      --steps 2 --warmup 1 --no-profile --planner "$@" --out "$out/$name.json" > "$out/$name.log" 2>&1
  echo "== $name (rc $?)"; grep -E "planner estimate|step [0-9]/|^longtrain|Error" "$out/$name.log" | tail -6
}
run one_rank_bf16_full --policy manual memory.recompute=full memory.tiled_loss=512
run fp32_weights_full --policy manual memory.recompute=full memory.tiled_loss=512 parallel.param_dtype=fp32
run one_rank_bf16_auto --policy auto
