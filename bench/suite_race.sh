#!/usr/bin/env bash
# Race longtrain, ALST (at its best: optimizer on the GPU unless it runs out of memory, cuDNN SDPA)
# and torchtitan 0.2.2 (CP ring attention, FSDP2, full AC, compiled loss) on one model at the given
# lengths, all on the GPUs of one machine, one run at a time: every length's three runs before the
# next length, so the most valuable numbers come first.
#   bash bench/suite_race.sh 131072 262144
# Meant to run in the background and be polled (bench/README.md, "The race"):
#   setsid nohup bash bench/suite_race.sh 131072 262144 > runs/race/suite.out 2>&1 < /dev/null &
#   tail runs/race/progress.log; python3 bench/common.py runs/race/*.json
# Needs the wheels in .whl/ (bench/README.md; run(carry=[".whl"])): installed into /tmp/site here.
# Environment: DIR (runs/race), CONFIG (llama3-8b), NPROC (2), STEPS (2), WARMUP (1), WHO ("ours alst
# titan"), TIMEOUT_S (per run; default 600 s up to 128K, 1200 s beyond), PY (python3), WHEELS (.whl;
# "none" for what is installed), OURS_EXTRA (flags and overrides for longtrain only), EXTRA (flags
# added to every run, e.g. EXTRA="--device cpu --tiny" NPROC=1 for a CPU check of the plumbing).
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: bash bench/suite_race.sh LENGTH [LENGTH ...]   (e.g. 131072 262144)"; exit 2; }
dir=${DIR:-runs/race}; config=${CONFIG:-llama3-8b}; nproc=${NPROC:-2}; steps=${STEPS:-2}; warmup=${WARMUP:-1}
who=${WHO:-"ours alst titan"}; py=${PY:-python3}
mkdir -p "$dir"
log="$dir/progress.log"
say() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$log"; }

whl=${WHEELS:-.whl}  # the carried wheels (WHEELS=none: use what is installed)
if [ -d "$whl" ] && ls "$whl"/*.whl > /dev/null 2>&1; then
  if ! $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$whl"/*.whl; then
    say "wheel install failed"; exit 1
  fi
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
say "race: config=$config nproc=$nproc steps=$steps warmup=$warmup lengths: $* ($who)"
$py -c "import torch, deepspeed, torchtitan; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'torchtitan', torchtitan.__version__)" 2>&1 | tail -1 | tee -a "$log"

tr="$py -m torch.distributed.run --standalone --nproc_per_node=$nproc"
common="--config $config --steps $steps --warmup $warmup ${EXTRA:-}"
for len in "$@"; do
  t=${TIMEOUT_S:-$([ "$len" -le 131072 ] && echo 600 || echo 1200)}
  for w in $who; do
    out="$dir/${w}_${len}.json"
    case $w in
      ours)  cmd="$tr bench/bench_train.py $common --seq-len $len --sp $nproc --policy auto --planner --out $out ${OURS_EXTRA:-}" ;;
      alst)  cmd="$py bench/alst_baseline.py --nproc $nproc $common --seq-len $len --sp $nproc --optimizer auto --sdpa-backend cudnn --out $out" ;;
      titan) cmd="$tr bench/torchtitan_baseline.py $common --seq-len $len --cp $nproc --out $out" ;;
      *) say "unknown system '$w' (give: ours alst titan)"; exit 2 ;;
    esac
    rm -f "$out"
    say "start $w $len (timeout ${t}s): $cmd"
    t0=$(date +%s)
    timeout -k 30 "$t" $cmd > "$dir/${w}_${len}.out" 2>&1
    rc=$?
    summary=$($py - "$out" <<'EOF'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as e:  # noqa: BLE001
    print(f"no record ({e.__class__.__name__})"); sys.exit()
step = d.get("step_time_s_median")
peak = d.get("peak_gpu_mem_gib")
ideal = (d.get("ideal") or {}).get("step_s")
print(f"status={d.get('status')} step={'-' if step is None else f'{step:.1f}'}s "
      f"ideal={'-' if ideal is None else f'{ideal:.1f}'}s peak={'-' if peak is None else f'{peak:.1f}'}GiB "
      f"[{d.get('configuration')}] {str(d.get('error') or '')[:200]}")
EOF
)
    say "end $w $len rc=$rc wall=$(( $(date +%s) - t0 ))s $summary"
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && say "  $w $len hit its ${t}s timeout"
  done
  $py bench/common.py "$dir"/*_"$len".json >> "$log" 2>&1  # this length's table so far
done
files=(); for len in "$@"; do for w in $who; do [ -f "$dir/${w}_${len}.json" ] && files+=("$dir/${w}_${len}.json"); done; done
$py bench/common.py "${files[@]}" 2>&1 | tee "$dir/table.txt" | tee -a "$log"
say "race done"
