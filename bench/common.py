"""What every benchmark script here shares: the result record, where its numbers come from, and
how it is written.

Owns:
- ``ResultWriter``: one JSON file per configuration, rewritten atomically after every phase, so a
  run killed at its time limit still leaves what it had measured (``status`` says how far it got);
- ``host_memory``: this process's peak and current resident set (``/proc``; psutil if present);
- ``gpu_memory``: peak allocated / reserved bytes and allocator retries (``torch.cuda``);
- ``apply_gpu_cap``: ``--gpu-cap-gb``, a smaller card made of the one at hand (the caching
  allocator's per-process fraction), so both systems' longest-sequence searches run at lengths
  whose steps take seconds, not the tens of minutes a full H200 needs near its limit;
- ``profile_step``: one step under ``torch.profiler``, its GPU kernels summed by category --
  attention kernels, NCCL kernels (communication), device<->host copies (offload) -- as time and
  as a share of the step, both summed per kernel and as the union of intervals (streams overlap,
  so the sums can exceed the step), plus the communication time no compute kernel overlaps;
- ``is_oom``: one test for "this configuration does not fit", whatever layer raised it;
- ``print_table``: the one-screen comparison of several result files.

The idea: bench_train.py (longtrain) and alst_baseline.py (DeepSpeed ALST) write the same schema
(``SCHEMA_KEYS``) so one table compares them, and longest_seq.py reads only ``status``.
"""

from __future__ import annotations

import json
import os
import re
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

SCHEMA_VERSION = 1

# Every result file carries these keys (None where a value could not be measured).
SCHEMA_KEYS = (
    "schema_version", "system", "status", "error", "config", "seq_len", "world_size", "sp", "dp",
    "batch_size", "tokens_per_step", "steps", "warmup", "step_times_s", "step_time_s_median",
    "tokens_per_s", "tokens_per_s_per_gpu", "mfu", "mfu_causal", "flops_per_token",
    "flops_per_token_causal", "peak_flops", "peak_flops_source", "peak_gpu_mem_gib",
    "peak_gpu_mem_gib_all_ranks", "peak_gpu_reserved_gib", "alloc_retries", "peak_host_rss_gib",
    "peak_host_rss_gib_sum_ranks", "profile", "loss", "setup_s", "device", "torch", "host", "date",
    "command",
)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def log(msg: str, rank: int = 0, all_ranks: bool = False) -> None:
    """Progress line with flush (rank 0 only unless ``all_ranks``)."""
    if rank == 0 or all_ranks:
        print(f"[bench r{rank} {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def base_record(system: str, argv: Optional[list] = None) -> dict:
    rec = {k: None for k in SCHEMA_KEYS}
    rec.update(schema_version=SCHEMA_VERSION, system=system, status="starting", date=now(),
               host=socket.gethostname(), command=" ".join(argv if argv is not None else sys.argv))
    try:
        import torch

        rec["torch"] = torch.__version__
    except Exception:  # noqa: BLE001 - informational only
        pass
    return rec


class ResultWriter:
    """Writes ``record`` to ``path`` atomically (temp file + rename) on every ``write()``."""

    def __init__(self, path: Optional[str], record: dict, enabled: bool = True):
        self.path = Path(path) if path else None
        self.record = record
        self.enabled = enabled and self.path is not None

    def update(self, **kw) -> None:
        self.record.update(kw)
        self.write()

    def write(self, force: bool = False) -> None:
        """``force``: the first write of a run, replacing a stale file from an earlier run."""
        if not self.enabled:
            return
        if not force and self.record.get("status") not in ("OOM", "no_fit", "error", "interrupted") \
                and _failed_elsewhere(self.path):
            return  # another rank already recorded why the run failed; keep that
        write_json_atomic(self.path, self.record)


def _failed_elsewhere(path: Path) -> bool:
    try:
        with open(path) as f:
            return json.load(f).get("failed_rank") is not None
    except (OSError, ValueError, AttributeError):
        return False


def write_json_atomic(path: Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, default=_json_default)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _json_default(o):
    try:
        import torch

        if isinstance(o, torch.Tensor):
            return o.item() if o.numel() == 1 else o.tolist()
        if isinstance(o, (torch.device, torch.dtype)):
            return str(o)
    except Exception:  # noqa: BLE001
        pass
    if isinstance(o, Path):
        return str(o)
    return repr(o)


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def host_memory() -> dict:
    """Peak (high-water mark) and current resident set of this process, GiB."""
    peak = cur = None
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) * 1024
                elif line.startswith("VmRSS:"):
                    cur = int(line.split()[1]) * 1024
    except OSError:
        pass
    if peak is None:  # not Linux: ru_maxrss is KiB on Linux, bytes on macOS
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = r if sys.platform == "darwin" else r * 1024
    if cur is None:
        try:
            import psutil

            cur = psutil.Process().memory_info().rss
        except Exception:  # noqa: BLE001
            cur = peak
    return {"peak_host_rss_gib": peak / 2**30, "host_rss_gib": cur / 2**30}


def gpu_memory(device) -> dict:
    import torch

    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return {"peak_gpu_mem_gib": None, "peak_gpu_reserved_gib": None, "alloc_retries": None}
    stats = torch.cuda.memory_stats(device)
    return {"peak_gpu_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_gpu_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
            "alloc_retries": int(stats.get("num_alloc_retries", 0))}


def add_gpu_cap_arg(parser) -> None:
    parser.add_argument("--gpu-cap-gb", type=float, default=0.0,
                        help="let this process allocate at most this many GiB of GPU memory "
                             "(torch.cuda.set_per_process_memory_fraction); 0 = the whole card")


def apply_gpu_cap(cap_gb: float, device) -> dict:
    """Cap the caching allocator of ``device`` at ``cap_gb`` GiB; the record's fields for it."""
    if not cap_gb:
        return {}
    import torch

    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        raise SystemExit(f"--gpu-cap-gb {cap_gb:g}: needs a CUDA device (this run is on {device}); drop the flag")
    total = torch.cuda.get_device_properties(device).total_memory
    if not 0 < cap_gb * 2**30 < total:
        raise SystemExit(f"--gpu-cap-gb {cap_gb:g}: give a size between 0 and the device's {total / 2**30:.1f} GiB")
    torch.cuda.set_per_process_memory_fraction(cap_gb * 2**30 / total, device)
    return {"gpu_cap_gib": cap_gb, "gpu_total_gib": total / 2**30}


def reset_gpu_peak(device) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def gather_across_ranks(value: float) -> list:
    """``value`` from every rank (rank order); ``[value]`` when not distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def device_name(device) -> str:
    import torch

    if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(device)}"
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# Failure classification
# --------------------------------------------------------------------------------------------

_OOM_PATTERNS = ("out of memory", "cuda_error_out_of_memory", "cudaerrormemoryallocation",
                 "cublas_status_alloc_failed", "cudnn_status_alloc_failed", "failed to allocate",
                 "cannot allocate memory", "std::bad_alloc")


def is_oom(exc: BaseException) -> bool:
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except Exception:  # noqa: BLE001
        pass
    if isinstance(exc, MemoryError):
        return True
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(p in text for p in _OOM_PATTERNS)


def maybe_simulate_oom(seq_len: int) -> None:
    """Test hook for the longest-sequence search on machines without a GPU: with
    ``BENCH_SIMULATE_OOM_ABOVE=N`` in the environment, a sequence longer than N raises the same
    out-of-memory error a GPU would."""
    limit = os.environ.get("BENCH_SIMULATE_OOM_ABOVE")
    only = os.environ.get("BENCH_SIMULATE_OOM_RANK")  # e.g. 1: the other ranks block in collectives
    if only and os.environ.get("RANK", "0") != only:
        return
    if limit and seq_len > int(limit):
        import torch

        raise torch.cuda.OutOfMemoryError(f"simulated: seq_len={seq_len} > BENCH_SIMULATE_OOM_ABOVE={limit}")


def short_error(exc: BaseException, limit: int = 2000) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[:limit] + " ..."


# --------------------------------------------------------------------------------------------
# Profiling one step: GPU kernel time by category
# --------------------------------------------------------------------------------------------

# Matched case-insensitively against kernel names. Order matters: the first match wins.
CATEGORIES = (
    ("communication", re.compile(r"nccl|all_?to_?all|allgather|reducescatter|all_?reduce|sendrecv", re.I)),
    ("attention", re.compile(r"flash|fmha|cudnn.*(attn|attention|sdpa|mha)|sdpa|scaled_dot|flex|"
                             r"attention|mha_|_attn_|triton_tem_fused", re.I)),
    ("offload_dtoh", re.compile(r"memcpy.*dtoh|memcpy.*device\s*->\s*pinned|memcpy.*device\s*->\s*pageable", re.I)),
    ("offload_htod", re.compile(r"memcpy.*htod|memcpy.*pinned\s*->\s*device|memcpy.*pageable\s*->\s*device", re.I)),
)
_NCCL_OP = re.compile(r"nccl(?:Dev)?Kernel_([A-Za-z]+)")
# a kernel counted as "compute" (for the exposed-communication figure) is anything on the GPU that
# is neither communication nor a host<->device copy
_NON_COMPUTE = {"communication", "offload_dtoh", "offload_htod"}


def categorize(name: str) -> str:
    for cat, rx in CATEGORIES:
        if rx.search(name):
            return cat
    if name.lower().startswith("memcpy") or name.lower().startswith("memset"):
        return "memcpy_other"
    return "other"


def _union(intervals: list) -> list:
    out = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def _length(intervals: list) -> float:
    return sum(e - s for s, e in intervals)


def _subtract(a: list, b: list) -> list:
    """Parts of the (merged) intervals ``a`` not covered by the (merged) intervals ``b``."""
    out, j = [], 0
    for s, e in a:
        cur = s
        while j < len(b) and b[j][1] <= cur:
            j += 1
        k = j
        while k < len(b) and b[k][0] < e:
            if b[k][0] > cur:
                out.append([cur, b[k][0]])
            cur = max(cur, b[k][1])
            k += 1
        if cur < e:
            out.append([cur, e])
    return out


def summarize_trace(trace_path: str, step_time_s: float) -> dict:
    """Sum the GPU events of a Chrome trace by category (seconds, and shares of ``step_time_s``)."""
    with open(trace_path) as f:
        trace = json.load(f)
    events = trace.get("traceEvents", trace if isinstance(trace, list) else [])
    per_cat: dict = {}
    intervals: dict = {}
    top: dict = {}
    comm_ops: dict = {}  # SendRecv = all-to-all (Ulysses); AllGather/ReduceScatter = FSDP/ZeRO-3
    n = 0
    for ev in events:
        if ev.get("ph") != "X":
            continue
        cat = str(ev.get("cat", "")).lower()
        if cat not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        name = str(ev.get("name", ""))
        dur = float(ev.get("dur", 0.0)) * 1e-6
        ts = float(ev.get("ts", 0.0)) * 1e-6
        c = categorize(name)
        n += 1
        per_cat[c] = per_cat.get(c, 0.0) + dur
        intervals.setdefault(c, []).append((ts, ts + dur))
        key = name[:120]
        top[key] = top.get(key, 0.0) + dur
        if c == "communication":
            op = _NCCL_OP.search(name)
            op = op.group(1) if op else "other"
            comm_ops[op] = comm_ops.get(op, 0.0) + dur
    union = {c: _union(iv) for c, iv in intervals.items()}
    compute = _union([x for c, iv in union.items() if c not in _NON_COMPUTE for x in iv])
    comm = union.get("communication", [])
    exposed_comm = _length(_subtract(comm, compute)) if comm else 0.0
    busy = _length(_union([x for iv in union.values() for x in iv]))
    denom = step_time_s if step_time_s and step_time_s > 0 else None

    def share(x):
        return (x / denom) if denom else None

    cats = ["attention", "communication", "offload_dtoh", "offload_htod", "memcpy_other", "other"]
    out = {
        "step_time_s": step_time_s,
        "n_gpu_events": n,
        "gpu_busy_s": busy,
        "gpu_busy_share": share(busy),
        "kernel_time_s": {c: per_cat.get(c, 0.0) for c in cats},
        "kernel_time_union_s": {c: _length(union.get(c, [])) for c in cats},
        "share_of_step": {c: share(per_cat.get(c, 0.0)) for c in cats},
        "communication_by_op_s": comm_ops,
        "exposed_communication_s": exposed_comm,
        "exposed_communication_share": share(exposed_comm),
        "top_kernels": sorted(({"name": k, "s": v} for k, v in top.items()), key=lambda d: -d["s"])[:15],
    }
    off = per_cat.get("offload_dtoh", 0.0) + per_cat.get("offload_htod", 0.0)
    out["attention_share"] = share(per_cat.get("attention", 0.0))
    out["communication_share"] = share(per_cat.get("communication", 0.0))
    out["offload_share"] = share(off)
    return out


def profile_step(step_fn, device, trace_dir: Optional[str] = None, keep_trace: bool = False) -> dict:
    """Run ``step_fn()`` once under torch.profiler and summarize its GPU kernels by category.

    Returns the summary (``summarize_trace``) plus the step's wall time under the profiler, or
    ``{"skipped": reason}`` on CPU. The profiler's own overhead lengthens this step; shares are
    against this step's own wall time, so they stay comparable.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    if getattr(device, "type", str(device)) != "cuda":
        t0 = time.perf_counter()
        step_fn()
        return {"skipped": "no GPU: kernel categories need CUDA", "step_time_s": time.perf_counter() - t0}
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=False,
                 with_stack=False, profile_memory=False) as prof:
        t0 = time.perf_counter()
        step_fn()
        sync(device)
        dt = time.perf_counter() - t0
    d = trace_dir or tempfile.gettempdir()
    Path(d).mkdir(parents=True, exist_ok=True)
    path = os.path.join(d, f"bench_trace_{os.getpid()}.json")
    prof.export_chrome_trace(path)
    try:
        summary = summarize_trace(path, dt)
    finally:
        if not keep_trace:
            try:
                os.unlink(path)
            except OSError:
                pass
    if keep_trace:
        summary["trace"] = path
    return summary


def median(xs: list) -> Optional[float]:
    return statistics.median(xs) if xs else None


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def _fmt(v, spec: str = ".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def row(rec: dict) -> dict:
    prof = rec.get("profile") or {}
    return {
        "system": rec.get("system"), "config": rec.get("config"), "seq": rec.get("seq_len"),
        "gpus": rec.get("world_size"), "sp": rec.get("sp"), "status": rec.get("status"),
        "step_s": _fmt(rec.get("step_time_s_median")),
        "tok/s": _fmt(rec.get("tokens_per_s"), ".4g"),
        "tok/s/gpu": _fmt(rec.get("tokens_per_s_per_gpu"), ".4g"),
        "mfu%": _fmt(None if rec.get("mfu") is None else 100 * rec["mfu"], ".1f"),
        "mfu_c%": _fmt(None if rec.get("mfu_causal") is None else 100 * rec["mfu_causal"], ".1f"),
        "peakGPU": _fmt(rec.get("peak_gpu_mem_gib"), ".1f"),
        "peakRSS": _fmt(rec.get("peak_host_rss_gib"), ".1f"),
        "attn%": _fmt(None if prof.get("attention_share") is None else 100 * prof["attention_share"], ".0f"),
        "comm%": _fmt(None if prof.get("communication_share") is None else 100 * prof["communication_share"], ".0f"),
        "offl%": _fmt(None if prof.get("offload_share") is None else 100 * prof["offload_share"], ".0f"),
    }


def print_table(records: list) -> str:
    rows = [row(r) for r in records]
    if not rows:
        return ""
    cols = list(rows[0].keys())
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(width[c]) for c in cols)]
    lines += ["  ".join(str(r[c]).ljust(width[c]) for c in cols) for r in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def print_profile(prof: dict) -> None:
    if not prof or "skipped" in prof:
        print(f"[bench] profile: {prof.get('skipped') if prof else 'none'}", flush=True)
        return
    st = prof["step_time_s"]
    print(f"[bench] profiled step {st:.3f} s, GPU busy {prof['gpu_busy_s']:.3f} s; kernel time by category "
          f"(sum over kernels / union of intervals / share of step):", flush=True)
    for c, v in prof["kernel_time_s"].items():
        u = prof["kernel_time_union_s"][c]
        print(f"    {c:14s} {v:8.3f} s  {u:8.3f} s  {100 * v / st if st else 0:6.1f}%", flush=True)
    print(f"    exposed communication (not overlapped by compute): {prof['exposed_communication_s']:.3f} s", flush=True)
    if prof.get("communication_by_op_s"):
        print("    NCCL by operation: " + ", ".join(f"{k} {v:.3f} s" for k, v in
                                                   sorted(prof["communication_by_op_s"].items())), flush=True)
    for k in prof.get("top_kernels", [])[:8]:
        print(f"      {k['s']:8.3f} s  {k['name']}", flush=True)


def main_table(argv: Optional[list] = None) -> None:
    """``python bench/common.py a.json b.json ...``: print the comparison table."""
    paths = argv if argv is not None else sys.argv[1:]
    recs = []
    for p in paths:
        try:
            with open(p) as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            print(f"skip {p}: {e}", file=sys.stderr)
            continue
        if isinstance(d, dict) and "trials" in d:  # a longest_seq.py log
            print_search(d)
        else:
            recs.append(d)
    if recs:
        print_table(recs)


def print_search(d: dict) -> None:
    r = d.get("result", {})
    print(f"{d.get('system')} {d.get('config')} on {d.get('nproc')} GPU(s) sp={d.get('sp')}: status "
          f"{d.get('status')} ({d.get('stop_reason', 'running')}); longest ok {r.get('longest_ok')}, "
          f"shortest fail {r.get('shortest_fail')}", flush=True)
    for t in d.get("trials", []):
        extra = f"peak GPU {t['peak_gpu_mem_gib']:.1f} GiB, " if t.get("peak_gpu_mem_gib") else ""
        step = f"step {t['step_time_s_median']:.1f} s, " if t.get("step_time_s_median") else ""
        err = f" {str(t.get('error'))[:120]}" if t.get("outcome") != "ok" and t.get("error") else ""
        forced = " [planner refused; leanest policy forced]" if t.get("policy_forced") else ""
        print(f"    {t['seq_len']:>10}  {t['outcome']:8s} {extra}{step}wall {t['wall_s']:.0f} s{forced}{err}", flush=True)


if __name__ == "__main__":
    main_table()
