#!/usr/bin/env bash
# Memory-policy runs on one GPU, one bench_train.py process per row, JSON per row in $DIR.
#
#   bash bench/suite_memory.sh policies DIR   # 1B at 32K and 64K: none / selective / full / full+offload
#   bash bench/suite_memory.sh looped DIR     # looped-1b vs a plain Llama of the same effective depth
#
# Each row is the normal training path (bench_train.py -> trainer setup) with --planner, so the
# record holds the planner's estimate beside the measured peak. `python bench/common.py DIR/*.json`
# prints the table. Rows that run out of memory are recorded as such (status OOM) and the suite
# goes on.
set -uo pipefail
what=${1:?policies|looped}
dir=${2:?output directory}
mkdir -p "$dir"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

row() {  # row NAME SEQ CONFIG [overrides...]
  local name=$1 seq=$2 config=$3
  shift 3
  echo "=== $name (seq $seq, $config): $*"
  torchrun --standalone --nproc_per_node=1 bench/bench_train.py --config "$config" --seq-len "$seq" \
    --steps 3 --warmup 1 --planner --out "$dir/$name.json" --policy manual "$@" 2>&1 \
    | grep -vE "^\s*$|Warning|warn\(" | tail -n 25
}

LOSS=memory.tiled_loss=512
case $what in
  policies)
    for seq in 32768 65536; do
      k=$((seq / 1024))k
      row "1b_${k}_none" $seq llama3.2-1b --no-profile memory.recompute=none
      row "1b_${k}_none_loss" $seq llama3.2-1b --no-profile memory.recompute=none $LOSS
      row "1b_${k}_selective_loss" $seq llama3.2-1b --no-profile memory.recompute=selective $LOSS
      row "1b_${k}_full_loss" $seq llama3.2-1b --no-profile memory.recompute=full $LOSS
      row "1b_${k}_full_offload_loss" $seq llama3.2-1b memory.recompute=full memory.offload=true $LOSS
    done
    ;;
  looped)
    # same width and effective depth (2 + 4x4 + 2 = 20 layers), same policy and length
    pol=(memory.recompute=full memory.offload=true memory.tiled_mlp=128 $LOSS)
    row looped1b_128k 131072 looped-1b --no-profile "${pol[@]}"
    row plain20_128k 131072 llama3.2-1b --no-profile model.n_layers=20 "${pol[@]}"
    ;;
  *) echo "unknown suite $what" >&2; exit 2 ;;
esac
python3 bench/common.py "$dir"/*.json || true
