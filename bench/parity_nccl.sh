#!/usr/bin/env bash
# Loss parity on GPUs with NCCL: the same tiny job at sp=1 (1 GPU) and under a 2-GPU layout, fp32,
# then the per-step losses side by side and their largest relative difference.
#   bash bench/parity_nccl.sh "parallel.sp=2" [extra overrides...]
set -euo pipefail
layout="$1"; shift || true
n=$(python3 -c "import torch; print(torch.cuda.device_count())")
common=(tiny-llama model.n_heads=4 model.n_kv_heads=2 data.seq_len=1024 data.batch_size=2 schedule.steps=20
        schedule.dtype=fp32 schedule.eval_every=0 logging.progress=false logging.log_every=1 checkpoint.save_final=false "$@")
out=${OUT:-/tmp}/parity; rm -rf "$out"; mkdir -p "$out"
python3 -m longtrain.launch.worker "${common[@]}" logging.run_dir="$out/one" > "$out/one.log" 2>&1
torchrun --standalone --nproc_per_node="$n" -m longtrain.launch.worker "${common[@]}" $layout \
    parallel.dp_shard=-1 logging.run_dir="$out/many" > "$out/many.log" 2>&1
python3 - "$out" "$layout" <<'PY'
import json, sys
out, layout = sys.argv[1], sys.argv[2]
read = lambda p: [json.loads(l) for l in open(p) if '"loss"' in l]
a, b = read(f"{out}/one/metrics.jsonl"), read(f"{out}/many/metrics.jsonl")
worst = 0.0
for x, y in zip(a, b):
    rel = abs(x["loss"] - y["loss"]) / abs(x["loss"])
    worst = max(worst, rel)
    print(f"step {x['step']:3d}  1 GPU {x['loss']:.6f}  {layout}: {y['loss']:.6f}  rel {rel:.2e}")
print(f"max relative loss difference over {len(a)} steps: {worst:.2e}")
PY
