"""bench/bench_ckpt.py runs end to end on CPU and reports consistent numbers."""

import json
import subprocess
import sys
from pathlib import Path


def test_bench_ckpt_tiny_cpu_reports_sizes_and_times(tmp_path):
    out = tmp_path / "r.json"
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, str(root / "bench/bench_ckpt.py"), "--config", "tiny-llama", "--tiny",
                    "--seq-len", "64", "--dir", str(tmp_path / "ck"), "--out", str(out)],
                   check=True, timeout=240, cwd=tmp_path)
    rec = json.loads(out.read_text())
    # fp32 weights + two Adam moments at least: 3 x 4 bytes per parameter
    assert rec["checkpoint_bytes"] >= 12 * rec["params"]
    assert rec["save_sync_s"] > 0 and rec["load_s"] > 0 and rec["async_stall_s"] >= 0
