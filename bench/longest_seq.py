"""The longest sequence that completes full training steps, for one shape and GPU count.

    python bench/longest_seq.py --config llama3-8b --nproc 2 --log runs/longest_8b_ours.json
    python bench/longest_seq.py --config llama3-8b --nproc 2 --alst --log runs/longest_8b_alst.json

Each trial is a fresh process (``torchrun`` for more than one GPU) of bench_train.py, or of
alst_baseline.py with ``--alst``, at one sequence length: by default one warmup and one timed
step (the second step is the one that runs with the optimizer state already allocated, so a
single step would overstate what fits). A trial passes when it writes ``status: "ok"``; an OOM,
an error or the per-trial timeout is a failure, recorded with its reason. A length longtrain's
planner refuses (``no_fit``: no policy fits within its reserve) is run again with the planner's
leanest policy forced (bench_train.py ``--policy leanest``; the record says ``policy_forced``), so
the search ends on what the GPU does; ``--no-force-leanest`` keeps the refusal as the failure. A fresh process per
trial means an OOM cannot poison the next trial's allocator.

Search, in units of ``--unit`` tokens (default 16K; every length is a multiple of unit x sp):
start at the memory planner's estimate when ``longtrain.memory.planner`` offers one (longtrain
only), else ``--start``; grow by ``--grow`` while trials pass (x2, or x1.25 from a planner
estimate), halve while they fail, then bisect between the longest pass and the shortest failure
until they are one unit apart (or within ``--rel-tol``). Stops early at ``--max-trials`` or when
the next trial would not finish within ``--time-budget-s`` (estimated from earlier trials,
quadratic in length).

Every trial is appended to the ``--log`` JSON (rewritten atomically after each), with
``result.longest_ok`` / ``result.shortest_fail`` so far, so a caller can poll it. Quadratic
attention makes million-token trials slow; run the search in the background and read the log
from later calls::

    nohup setsid python bench/longest_seq.py ... --log $LOG > $LOG.out 2>&1 &
    # later
    python bench/common.py $LOG                # a table of the trials so far

Arguments after ``--`` go to the trial script unchanged (config overrides, ALST flags).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
_ROOT = _BENCH.parent
for p in (str(_ROOT), str(_BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)

import common  # noqa: E402
from bench_train import build_parser as trial_parser, parse_seq_len  # noqa: E402

_MAX_SEQ_NAMES = ("max_seq_len", "longest_seq_len", "max_sequence_length", "find_max_seq_len", "max_seq")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="llama3.2-1b")
    p.add_argument("--nproc", type=int, default=1, help="GPUs (processes) per trial")
    p.add_argument("--sp", type=int, default=0, help="Ulysses size; 0 = --nproc")
    p.add_argument("--alst", action="store_true", help="search for the DeepSpeed ALST baseline instead of longtrain")
    p.add_argument("--policy", default="auto", help="longtrain memory.policy for the trials")
    p.add_argument("--unit", type=parse_seq_len, default=16384, help="granularity in tokens (x sp)")
    p.add_argument("--start", type=parse_seq_len, default=None,
                   help="first length tried (default: the planner's estimate for longtrain, else 64K x nproc)")
    p.add_argument("--no-planner", action="store_true", help="ignore the planner's estimate")
    p.add_argument("--no-force-leanest", action="store_true",
                   help="keep a length the planner refuses as a failure (no_fit) instead of running it "
                        "again with the planner's leanest policy forced (--policy leanest)")
    p.add_argument("--grow", type=float, default=0.0, help="growth factor while passing (0: 2, or 1.25 from a planner start)")
    p.add_argument("--max-seq", type=parse_seq_len, default=parse_seq_len("16M"))
    p.add_argument("--rel-tol", type=float, default=0.0, help="also stop when (fail - ok) <= rel_tol x ok")
    p.add_argument("--max-trials", type=int, default=16)
    p.add_argument("--time-budget-s", type=float, default=3000.0, help="whole search")
    p.add_argument("--trial-timeout-s", type=float, default=1200.0, help="one trial, setup included")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--log", required=True, help="JSON log of every trial (rewritten after each)")
    p.add_argument("--trial-dir", default=None, help="per-trial result files (default: <log>.trials/)")
    p.add_argument("--background", action="store_true", help="detach (new session) and return at once")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("passthrough", nargs=argparse.REMAINDER, help="after --: arguments for the trial script")
    return p


# --------------------------------------------------------------------------------------------
# Planner estimate (longtrain only; memory/planner.py is written in parallel: probe it)
# --------------------------------------------------------------------------------------------


def _gpu_total_gib():
    """The first GPU's memory from nvidia-smi: this process must not start CUDA (its context
    would take GPU memory from the trials)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30)
        return float(out.stdout.split()[0]) / 1024 if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, ValueError, subprocess.SubprocessError, IndexError):
        return None


def planner_start(args) -> tuple:
    """(tokens or None, how it was obtained): the longest length the planner finds a policy for."""
    if args.alst or args.no_planner or args.start is not None:
        return None, "not asked (--alst, --no-planner or --start)"
    extra = _passthrough(args)
    if "--tiny" in extra:
        return None, "not used with --tiny (the planner would see the full shape)"
    try:
        from longtrain.config import load_config
        from longtrain.memory import planner
    except Exception as e:  # noqa: BLE001
        return None, f"no planner: {common.short_error(e, 200)}"
    sp = args.sp or args.nproc
    overrides = [f"parallel.sp={sp}", f"memory.policy={args.policy}", "data.source=synthetic",
                 "data.batch_size=1", "model.max_seq_len=2147483647"]
    overrides += [a for a in extra if "=" in a and not a.startswith("-")]
    if not any(o.startswith("memory.gpu_budget_gb=") for o in overrides):
        # the capped card the trials get (--gpu-cap-gb, read by bench_train.py's own parser, as
        # the trial reads it), else the first GPU
        cap = trial_parser().parse_known_args(extra)[0].gpu_cap_gb
        gib = cap or _gpu_total_gib()
        if gib:
            overrides.append(f"memory.gpu_budget_gb={gib:.2f}")
    try:
        cfg = load_config(args.config, overrides)
    except Exception as e:  # noqa: BLE001
        return None, f"config: {common.short_error(e, 200)}"
    if hasattr(planner, "plan"):
        return _planner_bisect(args, planner, load_config, overrides)
    for name in _MAX_SEQ_NAMES:
        fn = getattr(planner, name, None)
        if not callable(fn):
            continue
        for call_args, call_kw in (((cfg,), {"world_size": args.nproc}), ((cfg, args.nproc), {}), ((cfg,), {})):
            try:
                res = fn(*call_args, **call_kw)
            except TypeError:
                continue
            except Exception as e:  # noqa: BLE001
                return None, f"planner.{name}: {common.short_error(e, 200)}"
            val = res.get("seq_len") if isinstance(res, dict) else getattr(res, "seq_len", res)
            if isinstance(val, (int, float)) and val > 0:
                return int(val), f"planner.{name}"
    return None, f"planner has none of {list(_MAX_SEQ_NAMES)}"


def _planner_bisect(args, planner, load_config, overrides) -> tuple:
    """Largest multiple of unit x sp for which ``planner.plan(cfg, nproc).chosen`` exists."""
    q = args.unit * (args.sp or args.nproc)

    def fits(n_units: int) -> bool:
        cfg = load_config(args.config, overrides + [f"data.seq_len={n_units * q}"])
        return planner.plan(cfg, args.nproc).chosen is not None

    try:
        if not fits(1):
            return None, "planner: even one unit does not fit"
        lo, hi = 1, 2
        while hi * q <= args.max_seq and fits(hi):
            lo, hi = hi, hi * 2
        if hi * q > args.max_seq:
            return lo * q, "planner.plan (capped by --max-seq)"
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo * q, "planner.plan"
    except Exception as e:  # noqa: BLE001
        return None, f"planner.plan: {common.short_error(e, 200)}"


def _passthrough(args) -> list:
    extra = list(args.passthrough or [])
    if extra and extra[0] == "--":
        extra = extra[1:]
    return extra


# --------------------------------------------------------------------------------------------
# One trial
# --------------------------------------------------------------------------------------------


def trial_command(args, seq: int, out: Path, policy: str | None = None) -> list:
    script = _BENCH / ("alst_baseline.py" if args.alst else "bench_train.py")
    sp = args.sp or args.nproc
    if args.nproc > 1:
        launcher = [args.python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    else:
        launcher = [args.python]
    cmd = launcher + [str(script), "--config", args.config, "--seq-len", str(seq), "--steps", str(args.steps),
                      "--warmup", str(args.warmup), "--no-profile", "--out", str(out), "--sp", str(sp)]
    extra = _passthrough(args)
    if not args.alst:
        cmd += ["--policy", policy or args.policy]
    elif not any(a == "--optimizer" or a.startswith("--optimizer=") for a in extra):
        # the longest sequence is found with ALST's leanest optimizer (on the CPU); under torchrun a
        # trial cannot take alst_baseline.py's auto (fresh process per attempt) anyway
        cmd += ["--optimizer", "cpu"]
    cmd += ["--no-kernel-rates"]
    # flags (--x) go before the overrides; bare key=value overrides last
    flags = [a for a in extra if a.startswith("-") or "=" not in a]
    overrides = [a for a in extra if not (a.startswith("-") or "=" not in a)]
    return cmd + flags + overrides


def run_trial(args, seq: int, trial_dir: Path, timeout_s: float) -> dict:
    """One trial; a length the planner refuses (``no_fit``) runs again with its leanest policy
    forced, so the search ends on what the GPU does, not on the planner's reserve."""
    t0 = time.time()
    t = _run_one(args, seq, trial_dir, timeout_s)
    if t["outcome"] == "no_fit" and args.policy == "auto" and not args.alst and not args.no_force_leanest:
        left = timeout_s - (time.time() - t0)
        forced = _run_one(args, seq, trial_dir, max(left, 1.0), policy="leanest")
        forced["planner"] = "no_fit: " + (t.get("error") or "")[:300]
        forced["policy_forced"] = "leanest"
        forced["wall_s"] += t["wall_s"]
        return forced
    return t


def _run_one(args, seq: int, trial_dir: Path, timeout_s: float, policy: str | None = None) -> dict:
    tag = f"{'alst' if args.alst else 'longtrain'}_{args.config}_{args.nproc}gpu_{seq}" + (f"_{policy}" if policy else "")
    out = trial_dir / f"{tag}.json"
    if out.exists():
        out.unlink()
    cmd = trial_command(args, seq, out, policy)
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH", "")) if p)
    print(f"[longest] trial seq={seq}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    logf = trial_dir / f"{tag}.log"
    with open(logf, "w") as lf:
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, env=env, cwd=str(_ROOT),
                                start_new_session=True)  # its own process group: a timeout kills all of it
        timed_out = False
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            rc = proc.returncode
    wall = time.time() - t0
    rec: dict = {}
    try:
        rec = json.loads(out.read_text())
    except (OSError, json.JSONDecodeError):
        pass
    status = rec.get("status")
    if timed_out:
        outcome = "timeout"
    elif status == "ok":
        outcome = "ok"
    elif status == "OOM":
        outcome = "OOM"
    elif status == "no_fit":
        outcome = "no_fit"  # longtrain's planner refused the length (memory.policy=auto)
    elif rc in (-9, 137) and status != "ok":
        outcome = "killed"  # host OOM killer, most likely
    else:
        outcome = "error"
    tail = ""
    try:
        tail = logf.read_text()[-1500:]
    except OSError:
        pass
    return {"seq_len": seq, "outcome": outcome, "returncode": rc, "wall_s": wall, "status": status,
            "error": rec.get("error"), "step_time_s_median": rec.get("step_time_s_median"),
            "tokens_per_s": rec.get("tokens_per_s"), "peak_gpu_mem_gib": rec.get("peak_gpu_mem_gib"),
            "peak_host_rss_gib": rec.get("peak_host_rss_gib"), "result_file": str(out), "log_file": str(logf),
            "log_tail": tail if outcome != "ok" else None}


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the trial's process group (torchrun and its workers), SIGKILL what is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


# --------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------


class Search:
    """Lengths are multiples of ``q`` (unit x sp). ``lo``: longest pass; ``hi``: shortest failure."""

    def __init__(self, q: int, start: int, grow: float, max_seq: int, rel_tol: float):
        self.q, self.grow, self.max_seq, self.rel_tol = q, grow, max_seq, rel_tol
        self.lo: int = 0
        self.hi = None
        self.first = self.round(start)

    def round(self, n: float) -> int:
        return max(self.q, int(n) // self.q * self.q)

    def record(self, seq: int, ok: bool) -> None:
        if ok:
            self.lo = max(self.lo, seq)
        else:
            self.hi = seq if self.hi is None else min(self.hi, seq)

    def next(self):
        """The next length to try, or None when done."""
        if self.lo == 0 and self.hi is None:
            return self.first
        if self.hi is None:  # all passed so far: grow
            nxt = self.round(max(self.lo * self.grow, self.lo + self.q))
            if self.lo >= self.max_seq:
                return None
            return min(nxt, self.round(self.max_seq))
        if self.lo == 0:  # all failed so far: halve
            nxt = self.round(self.hi / 2)
            return None if nxt >= self.hi else nxt
        if self.hi - self.lo <= self.q or (self.rel_tol and self.hi - self.lo <= self.rel_tol * self.lo):
            return None
        mid = self.round((self.lo + self.hi) / 2)
        if mid <= self.lo:
            mid = self.lo + self.q
        return None if mid >= self.hi else mid


def estimate_trial_s(trials: list, seq: int) -> float:
    """Expected wall time of a trial at ``seq``, from the longest finished trial (quadratic in
    length for the steps, plus its setup); 0 when nothing is known."""
    done = [t for t in trials if t["outcome"] == "ok" and t.get("wall_s")]
    if not done:
        return 0.0
    ref = max(done, key=lambda t: t["seq_len"])
    ratio = seq / ref["seq_len"]
    return ref["wall_s"] * max(1.0, ratio * ratio)


def search(args) -> dict:
    sp = args.sp or args.nproc
    q = args.unit * sp
    log_path = Path(args.log)
    trial_dir = Path(args.trial_dir) if args.trial_dir else log_path.with_suffix(".trials")
    trial_dir.mkdir(parents=True, exist_ok=True)
    est, how = planner_start(args)
    grow = args.grow or (1.25 if est else 2.0)
    start = est if est else (args.start or 65536 * args.nproc)
    s = Search(q, start, grow, args.max_seq, args.rel_tol)
    state = {
        "system": "alst" if args.alst else "longtrain", "config": args.config, "nproc": args.nproc, "sp": sp,
        "unit_tokens": q, "start": s.first, "start_from": how if est else "--start/default",
        "planner_estimate": est, "grow": grow, "max_trials": args.max_trials,
        "time_budget_s": args.time_budget_s, "trial_timeout_s": args.trial_timeout_s,
        "steps_per_trial": args.warmup + args.steps, "passthrough": _passthrough(args),
        "status": "running", "started": common.now(), "pid": os.getpid(), "trials": [],
        "result": {"longest_ok": None, "shortest_fail": None},
    }
    common.write_json_atomic(log_path, state)
    print(f"[longest] {state['system']} {args.config} on {args.nproc} GPU(s), sp={sp}: start {s.first} "
          f"({state['start_from']}), unit {q}, log {log_path}", flush=True)
    t_start = time.time()
    stop = "converged"
    while True:
        seq = s.next()
        if seq is None:
            break
        if len(state["trials"]) >= args.max_trials:
            stop = "max_trials"
            break
        left = args.time_budget_s - (time.time() - t_start)
        need = estimate_trial_s(state["trials"], seq)
        if left <= 0 or need > left:
            stop = f"time_budget (next trial at {seq} needs ~{need:.0f} s, {left:.0f} s left)"
            break
        t = run_trial(args, seq, trial_dir, timeout_s=min(args.trial_timeout_s, max(left, 1.0)))
        state["trials"].append(t)
        ok = t["outcome"] == "ok"
        s.record(seq, ok)
        state["result"] = {"longest_ok": s.lo or None, "shortest_fail": s.hi}
        common.write_json_atomic(log_path, state)
        print(f"[longest] seq={seq}: {t['outcome']} in {t['wall_s']:.0f} s"
              + (f" (peak GPU {t['peak_gpu_mem_gib']:.1f} GiB)" if t.get("peak_gpu_mem_gib") else "")
              + (f" -- {t['error'][:200]}" if t.get("error") and not ok else "")
              + f"; longest ok {s.lo or '-'}, shortest fail {s.hi or '-'}", flush=True)
        if t["outcome"] == "error" and s.lo == 0 and len(state["trials"]) == 1:
            stop = "first trial failed with an error that is not OOM (see log_tail)"
            break
    state["status"] = "done" if stop == "converged" else "stopped"
    state["stop_reason"] = stop
    state["finished"] = common.now()
    state["elapsed_s"] = time.time() - t_start
    common.write_json_atomic(log_path, state)
    print(f"[longest] {stop}: longest ok {s.lo or None}, shortest fail {s.hi} "
          f"({len(state['trials'])} trials, {state['elapsed_s']:.0f} s)", flush=True)
    return state


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.background:
        argv2 = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--background"]
        out = Path(args.log).with_suffix(".out")
        Path(args.log).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w") as f:
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv2], stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True, cwd=str(_ROOT))
        print(f"[longest] running in the background: pid {proc.pid}; log {args.log}; output {out}", flush=True)
        return 0
    search(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
