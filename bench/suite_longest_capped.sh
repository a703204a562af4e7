#!/usr/bin/env bash
# Longest sequence on one GPU capped at CAP GiB (--gpu-cap-gb), searches that end with real failed
# trials on both sides and fit one session: longtrain and ALST on Llama-3.2-1B, then looped-1b and
# the plain model of the same effective depth (Llama-3.2-1B with 20 layers: 2 + 4x4 + 2).
#   bash bench/suite_longest_capped.sh [CAP=24] [WHAT="ours alst"]   WHAT from: ours alst looped plain20
# Logs under $OUT (or runs/bench); run it in the background (setsid nohup ... &) and poll with
#   python3 bench/common.py $OUT/longest_*_cap$CAP.json
# ALST needs DeepSpeed on the path (the carried wheels, bench/README.md). BUDGET_S (600) bounds each
# search, TRIAL_S (300) each trial; raise TRIAL_S when two suites share the GPU.
set -uo pipefail
cap=${1:-24}; what=${2:-"ours alst"}
out=${OUT:-runs/bench}; mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
search() {
  name=$1; shift
  python3 bench/longest_seq.py --nproc 1 --rel-tol 0.05 --time-budget-s "${BUDGET_S:-600}" \
      --trial-timeout-s "${TRIAL_S:-300}" --log "$out/longest_${name}_cap$cap.json" "$@" > "$out/longest_${name}_cap$cap.out" 2>&1
  echo "== $name (rc $?)"; python3 bench/common.py "$out/longest_${name}_cap$cap.json" | tail -4
}
for w in $what; do
  case $w in
    ours)    search 1b_ours    --config llama3.2-1b -- --gpu-cap-gb "$cap" ;;
    alst)    search 1b_alst    --config llama3.2-1b --alst --start 128K -- --gpu-cap-gb "$cap" --sdpa-backend cudnn ;;
    looped)  search looped_1b  --config looped-1b -- --gpu-cap-gb "$cap" ;;
    plain20) search plain20_1b --config llama3.2-1b -- --gpu-cap-gb "$cap" model.n_layers=20 ;;
    *) echo "unknown search '$w' (give: ours alst looped plain20)"; exit 2 ;;
  esac
done
