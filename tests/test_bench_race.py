"""The race against the peers at their strongest settings: what runs without a GPU.

- ALST's ``--optimizer auto`` runs the GPU optimizer first and the CPU optimizer in a fresh run only
  after an out-of-memory error (the decision, on recorded outcomes; and the real re-launch with a
  simulated OOM), and refuses to run under torchrun;
- the torchtitan baseline's configuration: its command line for torchtitan, and the FFN arguments
  that reproduce our ``ffn_dim`` with torchtitan's rounding; a one-process CPU run through
  torchtitan's Trainer when torchtitan is importable (the carried wheels, bench/README.md);
- suite_race.sh runs its systems per length and leaves records, a progress log and a table;
- the longest-sequence search gives ALST trials the CPU optimizer unless its flags name one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import alst_baseline  # noqa: E402
import common  # noqa: E402
import torchtitan_baseline  # noqa: E402


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "BENCH_SIMULATE_OOM_ABOVE",
              "BENCH_SIMULATE_OOM_OPTIMIZER"):
        env.pop(k, None)
    env["OMP_NUM_THREADS"] = "2"
    env.update(extra)
    return env


def _fake_attempts(tmp_path, outcomes: dict):
    """``make_cmd`` for ``run_attempts``: each attempt writes the record ``outcomes[optimizer]``."""
    calls = []

    def make_cmd(opt, path):
        calls.append(opt)
        rec = {"status": outcomes[opt], "optimizer_placement": opt,
               "step_time_s_median": 1.0 if outcomes[opt] == "ok" else None}
        code = f"import json; json.dump({rec!r}, open({str(path)!r}, 'w'))"
        return [sys.executable, "-c", code]

    return make_cmd, calls


@pytest.mark.parametrize("outcomes, tried, rc", [
    ({"gpu": "ok", "cpu": "ok"}, ["gpu"], 0),            # fits with the optimizer on the GPU: done
    ({"gpu": "OOM", "cpu": "ok"}, ["gpu", "cpu"], 0),    # out of memory: the CPU optimizer, fresh run
    ({"gpu": "OOM", "cpu": "OOM"}, ["gpu", "cpu"], 3),   # neither fits
    ({"gpu": "error", "cpu": "ok"}, ["gpu"], 1),         # a failure that is not memory is not hidden
])
def test_alst_auto_optimizer_falls_back_to_the_cpu_only_after_an_oom(tmp_path, outcomes, tried, rc):
    out = tmp_path / "a.json"
    args = alst_baseline.build_parser().parse_args(["--out", str(out)])
    assert args.optimizer == "auto" and args.sdpa_backend == "cudnn"
    make_cmd, calls = _fake_attempts(tmp_path, outcomes)
    assert alst_baseline.run_attempts(args, [], make_cmd) == rc
    rec = json.loads(out.read_text())
    assert calls == tried
    assert [a["optimizer"] for a in rec["optimizer_attempts"]] == tried
    assert [a["status"] for a in rec["optimizer_attempts"]] == [outcomes[o] for o in tried]
    assert rec["optimizer_fallback"] == (len(tried) > 1)
    assert rec["optimizer_placement"] == tried[-1]


def test_alst_forced_optimizer_runs_once(tmp_path):
    args = alst_baseline.build_parser().parse_args(["--out", str(tmp_path / "a.json"), "--optimizer", "cpu"])
    make_cmd, calls = _fake_attempts(tmp_path, {"cpu": "OOM"})
    assert alst_baseline.run_attempts(args, [], make_cmd) == 3 and calls == ["cpu"]


def test_alst_child_command_replaces_optimizer_and_nproc():
    argv = ["--config", "llama3-8b", "--nproc", "2", "--optimizer=auto", "--seq-len", "128K", "--out", "x.json"]
    child = alst_baseline.child_argv(argv, "gpu")
    assert child == ["--config", "llama3-8b", "--seq-len", "128K", "--out", "x.json", "--optimizer", "gpu"]
    cmd = alst_baseline.launch_cmd(2, child)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert cmd[5].endswith("alst_baseline.py") and cmd[6:] == child
    assert alst_baseline.launch_cmd(1, child)[1].endswith("alst_baseline.py")


def test_alst_auto_relaunches_itself_with_the_cpu_optimizer_after_a_simulated_oom(tmp_path):
    # every length above 128 "runs out of memory": the GPU attempt, then the CPU attempt (both stop
    # before DeepSpeed is imported, so this runs without it)
    out = tmp_path / "a.json"
    cmd = [sys.executable, str(ROOT / "bench" / "alst_baseline.py"), "--config", "llama3.2-1b", "--device", "cpu",
           "--tiny", "--steps", "1", "--warmup", "0", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(BENCH_SIMULATE_OOM_ABOVE="128"), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    rec = json.loads(out.read_text())
    assert rec["status"] == "OOM" and rec["optimizer_fallback"] is True
    assert [(a["optimizer"], a["status"]) for a in rec["optimizer_attempts"]] == [("gpu", "OOM"), ("cpu", "OOM")]
    assert "--optimizer gpu" in proc.stdout and "--optimizer cpu" in proc.stdout


def test_alst_auto_refuses_to_run_under_torchrun(tmp_path):
    out = tmp_path / "a.json"
    cmd = [sys.executable, str(ROOT / "bench" / "alst_baseline.py"), "--device", "cpu", "--tiny", "--out", str(out)]
    env = _env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "--optimizer auto runs each attempt in a fresh process" in proc.stderr
    assert json.loads(out.read_text())["status"] == "error"


def test_torchtitan_ffn_args_reproduce_our_ffn_dim_with_torchtitans_rounding():
    def titan_hidden(dim, multiple_of, ffn_dim_multiplier):  # torchtitan llama3 FeedForward.__init__
        hidden = int(2 * 4 * dim / 3)
        if ffn_dim_multiplier is not None:
            hidden = int(ffn_dim_multiplier * hidden)
        return multiple_of * ((hidden + multiple_of - 1) // multiple_of)

    for dim, ffn in ((4096, 14336), (2048, 8192), (128, 352), (4096, 8192), (3072, 8192)):
        assert titan_hidden(dim, **torchtitan_baseline.ffn_args(dim, ffn)) == ffn, (dim, ffn)
    # Llama-3-8B: torchtitan's own "8B" flavour (multiplier 1.3, multiple of 1024) gives the same 14336
    assert titan_hidden(4096, 1024, 1.3) == 14336


def test_torchtitan_command_line_names_its_strongest_fitting_setting(tmp_path):
    args = torchtitan_baseline.build_parser().parse_args(["--seq-len", "128K"])
    assert args.config == "llama3-8b" and args.ac == "full" and args.compile_loss
    cli = torchtitan_baseline.titan_cli(args, 131072, 2, 4, str(tmp_path))
    pairs = dict(zip(cli[::2], cli[1::2]))
    assert pairs["--parallelism.context_parallel_degree"] == "2"
    assert pairs["--parallelism.data_parallel_shard_degree"] == "-1"
    assert pairs["--activation_checkpoint.mode"] == "full"
    assert pairs["--training.dtype"] == "float32" and pairs["--training.mixed_precision_param"] == "bfloat16"
    assert pairs["--training.seq_len"] == "131072" and pairs["--training.steps"] == "4"
    assert cli[cli.index("--compile.enable") + 1:cli.index("--compile.enable") + 3] == ["--compile.components", "loss"]
    args = torchtitan_baseline.build_parser().parse_args(["--no-compile-loss", "--ac", "selective",
                                                          "--titan-arg=--parallelism.context_parallel_rotate_method=alltoall"])
    cli = torchtitan_baseline.titan_cli(args, 4096, 1, 3, str(tmp_path))
    assert "--compile.no-enable" in cli and "--compile.enable" not in cli
    assert cli[-1] == "--parallelism.context_parallel_rotate_method=alltoall"


@pytest.mark.skipif(importlib.util.find_spec("torchtitan") is None,
                    reason="torchtitan not importable (the carried wheels: bench/README.md)")
def test_torchtitan_tiny_cpu_run_through_its_trainer(tmp_path):
    out = tmp_path / "t.json"
    cmd = [sys.executable, str(ROOT / "bench" / "torchtitan_baseline.py"), "--config", "llama3.2-1b", "--device",
           "cpu", "--tiny", "--steps", "2", "--warmup", "1", "--no-compile-loss", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert rec["status"] == "ok" and rec["system"] == "torchtitan" and rec["versions"]["torchtitan"] == "0.2.2"
    assert not [k for k in common.SCHEMA_KEYS if k not in rec]
    assert len(rec["step_times_s"]) == 2 and rec["loss"] > 0
    assert rec["configuration"].startswith("one rank, no FSDP, AC=full, compile=off")
    assert "--activation_checkpoint.mode" in rec["titan_cli"]


def test_suite_race_runs_each_system_per_length_and_writes_a_table(tmp_path):
    env = _env(DIR=str(tmp_path), CONFIG="llama3.2-1b", NPROC="1", WHO="ours", STEPS="1", WARMUP="0", WHEELS="none",
               EXTRA="--device cpu --tiny --no-profile", PY=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "suite_race.sh"), "256"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    progress = (tmp_path / "progress.log").read_text()
    assert "start ours 256" in progress and "end ours 256 rc=0" in progress and "status=ok" in progress
    assert progress.rstrip().endswith("race done")
    assert json.loads((tmp_path / "ours_256.json").read_text())["status"] == "ok"
    assert "longtrain" in (tmp_path / "table.txt").read_text()


def test_longest_search_runs_alst_trials_with_the_cpu_optimizer_unless_told(tmp_path):
    import longest_seq

    def cmd(*flags):
        args = longest_seq.build_parser().parse_args(["--alst", "--nproc", "2", "--log", str(tmp_path / "l.json"),
                                                      "--", *flags])
        return longest_seq.trial_command(args, 65536, tmp_path / "t.json")

    c = cmd("--sdpa-backend", "cudnn")
    assert c[c.index("--optimizer") + 1] == "cpu" and "--no-kernel-rates" in c and "torch.distributed.run" in c
    c = cmd("--optimizer", "gpu")
    assert c.count("--optimizer") == 1 and c[c.index("--optimizer") + 1] == "gpu"
