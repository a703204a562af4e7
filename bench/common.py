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
- ``kernel_rates`` / ``ideal_step``: the kernel-bound ideal step, from the bf16 matmul rate and the
  causal attention rate measured in the same process at start (no recomputation, no waits);
  ``step_breakdown``: the profiled step's time split into attention, matmuls, recomputation,
  collectives, optimizer, offload copies and idle GPU;
- ``print_table``: the one-screen comparison of several result files, each run's configuration and
  its step time over longtrain's at the same model and length.

The idea: bench_train.py (longtrain) and alst_baseline.py (DeepSpeed ALST) write the same schema
(``SCHEMA_KEYS``) so one table compares them, and longest_seq.py reads only ``status``.
"""

from __future__ import annotations

import functools
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
    "command", "configuration", "kernel_rates", "ideal", "step_breakdown",
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
                and failed_elsewhere(self.path):
            return  # another rank already recorded why the run failed; keep that
        write_json_atomic(self.path, self.record)


def failed_elsewhere(path: Path) -> bool:
    """Whether the record at ``path`` already says a rank failed (``failed_rank``)."""
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


def ensure_launcher_env() -> None:
    """A bare ``python script.py`` is a world of one: the environment torchrun would set, on a free
    port (DeepSpeed would otherwise try MPI discovery; torch.distributed needs the variables)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


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
    # the optimizer's own kernels (torch fused/foreach AdamW, DeepSpeed FusedAdam); gradient clipping's
    # foreach norm kernels stay in "other"
    ("optimizer", re.compile(r"adam", re.I)),
    # cuBLAS / CUTLASS GEMMs (Hopper: nvjet_*, sm90_xmma_gemm_*, cutlass3x_sm90_*gemm*)
    ("matmul", re.compile(r"gemm|nvjet|xmma|cutlass|cublas|wgmma", re.I)),
)
_CATS = ("attention", "matmul", "communication", "optimizer", "offload_dtoh", "offload_htod", "memcpy_other",
         "other")
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
    opt_host: list = []  # host spans of torch.optim steps ("Optimizer.step#AdamW.step"): a CPU optimizer's time
    for ev in events:
        if ev.get("ph") != "X":
            continue
        cat = str(ev.get("cat", "")).lower()
        if cat == "user_annotation" and str(ev.get("name", "")).startswith("Optimizer.step#"):
            ts = float(ev.get("ts", 0.0)) * 1e-6
            opt_host.append((ts, ts + float(ev.get("dur", 0.0)) * 1e-6))
            continue
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

    cats = list(_CATS)
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
        "optimizer_host_s": _length(_union(opt_host)),
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
# The kernel-bound ideal: what a step would take at the kernels' own rates
# --------------------------------------------------------------------------------------------

_SDPA_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                  "math": "MATH"}


def _time_cuda(fn, reps: int, device) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs, each timed with CUDA events (after one warm run)."""
    import torch

    fn()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3)
    return statistics.median(times)


def kernel_rates(device, n_heads: int, n_kv_heads: int, head_dim: int, attn_backend: str = "cudnn",
                 attn_seq: int = 32768, mm_n: int = 8192, reps: int = 5) -> dict:
    """The bf16 matmul rate (``mm_n``^3 products, random data) and the causal attention forward +
    backward rate of the kernel a run uses, at its per-GPU head shape, measured here (CUDA events,
    median of ``reps``). Attention FLOPs follow trainer/metrics.py (training = 3 x forward, forward =
    4·S²·H·D halved for causal), so ideal times computed from these rates and that module's counts
    are in one convention. About a second on an H200; ``{"skipped": ...}`` without a GPU.

    ``attn_backend``: ``cudnn`` / ``flash`` / ``efficient`` / ``math`` pins PyTorch SDPA's kernel,
    ``default`` lets PyTorch choose (one rate per SDPA call of shape [1, H, S, D], GQA through
    ``enable_gqa``)."""
    import torch

    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return {"skipped": "no GPU"}
    t0 = time.perf_counter()
    out: dict = {"attention_backend": attn_backend, "attention_shape": {"heads": n_heads, "kv_heads": n_kv_heads,
                                                                      "head_dim": head_dim, "seq": attn_seq},
                 "matmul_n": mm_n}
    out["matmul_flops"] = _matmul_rate(device, mm_n, max(reps, 10))
    torch.cuda.empty_cache()
    out.update(_attention_rate(device, n_heads, n_kv_heads, head_dim, attn_backend, attn_seq, reps))
    torch.cuda.empty_cache()
    out["measure_s"] = time.perf_counter() - t0
    return out


def _matmul_rate(device, n: int, reps: int) -> float:
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n ** 3 / _time_cuda(lambda: torch.mm(a, b), reps, device)


def _attention_rate(device, n_heads: int, n_kv_heads: int, head_dim: int, backend: str, seq: int,
                    reps: int) -> dict:
    """``{"attention_flops": rate}`` of causal SDPA forward + backward (3 x forward FLOPs); when the
    kernel refuses ``enable_gqa``, the same FLOPs with K/V expanded to every head (noted)."""
    import contextlib

    import torch
    import torch.nn.functional as F

    def ctx():  # a fresh one per use: sdpa_kernel is a one-shot context manager
        if backend not in _SDPA_BACKENDS:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([getattr(SDPBackend, _SDPA_BACKENDS[backend])])

    def rate(kv_heads: int) -> float:
        mk = functools.partial(torch.randn, device=device, dtype=torch.bfloat16)
        q = mk(1, n_heads, seq, head_dim).requires_grad_()
        k = mk(1, kv_heads, seq, head_dim).requires_grad_()
        v = mk(1, kv_heads, seq, head_dim).requires_grad_()
        go = mk(1, n_heads, seq, head_dim)
        gqa = n_heads != kv_heads

        def fwd_bwd():
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa).backward(go)

        with ctx():
            dt = _time_cuda(fwd_bwd, reps, device)
        return 3 * (4 * seq * seq * n_heads * head_dim / 2) / dt  # causal: the lower triangle

    try:
        return {"attention_flops": rate(n_kv_heads)}
    except RuntimeError as e:
        if n_kv_heads == n_heads:  # the pinned kernel refuses this shape: say so rather than guess
            return {"attention_flops": None, "attention_error": short_error(e, 300)}
        note = f"enable_gqa refused ({short_error(e, 200)}); K/V expanded to {n_heads} heads"
    try:
        return {"attention_flops": rate(n_heads), "attention_gqa_note": note}
    except RuntimeError as e:
        return {"attention_flops": None, "attention_error": short_error(e, 300), "attention_gqa_note": note}


def ideal_step(model_cfg, seq_len: int, tokens_per_step: int, world: int, rates: dict) -> dict:
    """Seconds a step would take if every GPU did only the model's FLOPs (no recomputation) at the
    measured kernel rates: matmul FLOPs / matmul rate + causal attention FLOPs / attention rate, per
    GPU (the work of ``tokens_per_step`` tokens split over ``world`` GPUs). FLOP counts:
    ``models/costs.py`` (``flops_per_token``, ``matmul_params_per_token``)."""
    from longtrain.models.costs import flops_per_token, matmul_params_per_token

    mm_fpt = 6.0 * matmul_params_per_token(model_cfg)  # forward + backward = 3 x (2 per weight)
    attn_fpt = flops_per_token(model_cfg, seq_len, causal=True) - mm_fpt
    out = {"matmul_flops_per_token": mm_fpt, "attention_flops_per_token_causal": attn_fpt}
    if not rates or rates.get("skipped") or not rates.get("matmul_flops") or not rates.get("attention_flops"):
        out["skipped"] = (rates or {}).get("skipped") or (rates or {}).get("attention_error") or "no rates"
        return out
    per_gpu = tokens_per_step / world
    out["matmul_s"] = per_gpu * mm_fpt / rates["matmul_flops"]
    out["attention_s"] = per_gpu * attn_fpt / rates["attention_flops"]
    out["step_s"] = out["matmul_s"] + out["attention_s"]
    return out


def step_breakdown(prof: dict, ideal: Optional[dict]) -> dict:
    """Shares of the profiled step (each its kernels' summed time / the step's wall time; streams
    overlap, so they can add past 1):

    - ``attention``, ``matmul``: kernel time (recomputed forwards included);
    - ``recompute_est``: attention + matmul kernel time beyond the ideal's (the model's FLOPs at the
      microbenchmark rates): recomputation, plus kernels running below their microbenchmark rate;
    - ``all_to_all``: NCCL SendRecv/AllToAll (Ulysses' all-to-all, ring attention's send/recv);
      ``collectives``: the other NCCL kernels (FSDP/ZeRO gathers and reductions);
      ``exposed_communication``: NCCL time no compute kernel overlaps;
    - ``optimizer``: the optimizer's GPU kernels, or its host span where that is longer (a CPU Adam);
    - ``offload``: device<->host copies;
    - ``gpu_idle``: wall time with no kernel or copy on the GPU (host-bound work, waits)."""
    if not prof or "skipped" in prof or not prof.get("step_time_s"):
        return {}
    st = prof["step_time_s"]
    k = prof["kernel_time_s"]
    by_op = prof.get("communication_by_op_s") or {}
    a2a = sum(v for op, v in by_op.items() if op.lower() in ("sendrecv", "alltoall", "send", "recv"))
    out = {
        "attention": k.get("attention", 0.0) / st,
        "matmul": k.get("matmul", 0.0) / st,
        "all_to_all": a2a / st,
        "collectives": max(0.0, k.get("communication", 0.0) - a2a) / st,
        "exposed_communication": prof.get("exposed_communication_s", 0.0) / st,
        "optimizer": max(k.get("optimizer", 0.0), prof.get("optimizer_host_s", 0.0)) / st,
        "offload": (k.get("offload_dtoh", 0.0) + k.get("offload_htod", 0.0)) / st,
        "gpu_idle": max(0.0, st - prof.get("gpu_busy_s", 0.0)) / st,
        "other_kernels": (k.get("other", 0.0) + k.get("memcpy_other", 0.0)) / st,
    }
    if ideal and ideal.get("step_s") is not None:
        extra = k.get("attention", 0.0) + k.get("matmul", 0.0) - ideal["step_s"]
        out["recompute_est"] = max(0.0, extra) / st
    return out


def add_ideal(rec: dict, model_cfg, world: int) -> None:
    """Fill ``ideal`` (and ``ideal.over_measured``) and ``step_breakdown`` of a record from its
    ``kernel_rates``, ``profile`` and median step time."""
    if rec.get("seq_len") and rec.get("tokens_per_step"):
        rec["ideal"] = ideal_step(model_cfg, rec["seq_len"], rec["tokens_per_step"], world, rec.get("kernel_rates"))
        med = rec.get("step_time_s_median")
        if rec["ideal"].get("step_s") and med:
            rec["ideal"]["over_measured"] = rec["ideal"]["step_s"] / med
    rec["step_breakdown"] = step_breakdown(rec.get("profile") or {}, rec.get("ideal"))


def print_ideal(rec: dict) -> None:
    r, i, b = rec.get("kernel_rates") or {}, rec.get("ideal") or {}, rec.get("step_breakdown") or {}
    if r.get("matmul_flops"):
        att = r.get("attention_flops")
        print(f"[bench] kernel rates here: bf16 matmul {r['matmul_flops'] / 1e12:.0f} TFLOP/s, causal attention "
              f"fwd+bwd ({r.get('attention_backend')}, {r.get('attention_shape')}) "
              f"{'-' if att is None else f'{att / 1e12:.0f}'} TFLOP/s ({r.get('measure_s', 0):.1f} s)", flush=True)
    if i.get("step_s"):
        med = rec.get("step_time_s_median")
        print(f"[bench] ideal step (model FLOPs at these rates, no recomputation): {i['step_s']:.2f} s = matmuls "
              f"{i['matmul_s']:.2f} s + attention {i['attention_s']:.2f} s; measured "
              f"{'-' if med is None else f'{med:.2f}'} s", flush=True)
    if b:
        print("[bench] profiled step: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in b.items()), flush=True)


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def _fmt(v, spec: str = ".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _pct(x) -> str:
    return _fmt(None if x is None else 100 * x, ".0f")


def _base_config(rec: dict) -> str:
    return str(rec.get("config") or "").split(" (")[0]


def row(rec: dict, ref_step: Optional[float] = None) -> dict:
    """One table row; ``ref_step``: longtrain's median step at the same model and length, for the
    ``x_ours`` column (this run's step time over ours: > 1 means slower than longtrain)."""
    prof = rec.get("profile") or {}
    b = rec.get("step_breakdown") or {}
    ideal = (rec.get("ideal") or {}).get("step_s")
    med = rec.get("step_time_s_median")
    return {
        "system": rec.get("system"), "config": rec.get("config"), "seq": rec.get("seq_len"),
        "gpus": rec.get("world_size"), "sp": rec.get("sp"), "status": rec.get("status"),
        "step_s": _fmt(med),
        "x_ours": _fmt(med / ref_step if med and ref_step else None, ".2f"),
        "ideal_s": _fmt(ideal),
        "tok/s/gpu": _fmt(rec.get("tokens_per_s_per_gpu"), ".4g"),
        "mfu_c%": _fmt(None if rec.get("mfu_causal") is None else 100 * rec["mfu_causal"], ".1f"),
        "peakGPU": _fmt(rec.get("peak_gpu_mem_gib"), ".1f"),
        "peakRSS": _fmt(rec.get("peak_host_rss_gib"), ".1f"),
        "attn%": _pct(prof.get("attention_share")),
        "mm%": _pct(b.get("matmul")),
        "recomp%": _pct(b.get("recompute_est")),
        "comm%": _pct(prof.get("communication_share")),
        "opt%": _pct(b.get("optimizer")),
        "offl%": _pct(prof.get("offload_share")),
        "idle%": _pct(b.get("gpu_idle")),
        "configuration": rec.get("configuration") or "-",
    }


def print_table(records: list) -> str:
    """The comparison table: one row per record; ``x_ours`` = step time / longtrain's (same model,
    same length, ``ok``) where the table holds such a longtrain record; ``configuration`` names what
    each run actually used (optimizer placement, offloads, kernels, fallbacks)."""
    ref = {}
    for r in records:
        if r.get("system") == "longtrain" and r.get("status") == "ok" and r.get("step_time_s_median"):
            ref.setdefault((_base_config(r), r.get("seq_len")), r["step_time_s_median"])
    rows = [row(r, ref.get((_base_config(r), r.get("seq_len")))) for r in records]
    if not rows:
        return ""
    cols = list(rows[0].keys())
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(width[c]) for c in cols).rstrip()]
    lines += ["  ".join(str(r[c]).ljust(width[c]) for c in cols).rstrip() for r in rows]
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


def mem_line(device) -> str:
    """Peak GPU memory and host RSS, for a step's log line."""
    m = gpu_memory(device)
    h = host_memory()
    gpu = f"peak GPU {m['peak_gpu_mem_gib']:.2f} GiB " if m["peak_gpu_mem_gib"] is not None else ""
    return f"{gpu}RSS {h['host_rss_gib']:.2f} GiB"


def fill_rates(rec: dict, times: list, tokens_per_step: float, fpt: float, fpt_c: float, peak: float,
               world: int) -> None:
    """The median step time of ``times`` and what follows from it: tokens/s (all GPUs, per GPU) and
    MFU by the non-causal and the causal FLOP count."""
    med = median(times)
    tps = tokens_per_step / med
    rec.update(step_time_s_median=med, tokens_per_s=tps, tokens_per_s_per_gpu=tps / world,
               mfu=tps * fpt / (peak * world), mfu_causal=tps * fpt_c / (peak * world))


def finish_record(rec: dict, writer, device, model_cfg, world: int, rank: int, prof) -> None:
    """A run that went well: memory peaks over ranks, the kernel-bound ideal step, status ok, the
    record written, and on rank 0 the profile, the ideal and the table printed."""
    record_peaks(rec, device)
    add_ideal(rec, model_cfg, world)
    rec["status"] = "ok"
    writer.write()
    if rank == 0:
        print_profile(prof or {})
        print_ideal(rec)
        print_table([rec])


def run_main(system: str, who: str, run, args, argv, status_of=None, first_only: bool = True) -> int:
    """A benchmark's ``main``: a record for ``system`` written from the start, ``run(args, writer,
    rec)``, and any failure turned into the record (``record_failure``; ``status_of(e)`` may name
    a status of the script's own) and the process ended at once -- a collective peer may be gone,
    and destroying NCCL can hang."""
    rank = int(os.environ.get("RANK", "0"))
    rec = base_record(system, [sys.executable, *sys.argv] if argv is None else list(argv))
    writer = ResultWriter(args.out, rec, enabled=(rank == 0))
    writer.write(force=True)
    try:
        run(args, writer, rec)
    except BaseException as e:  # noqa: BLE001 - every failure becomes a record
        status = status_of(e) if status_of is not None else None
        os._exit(record_failure(rec, e, args.out, rank, who, status, first_only))
    shutdown_distributed()
    return 0


def run_timed_steps(step, *, warmup: int, steps: int, profile: bool, trace_dir, rec: dict, writer, device,
                    rank: int, tokens_per_step: float, world: int, fpt: float, fpt_c: float, peak: float,
                    loss_value=float) -> dict | None:
    """The peers' common measurement: ``warmup`` untimed steps, ``steps`` timed ones (each between
    device syncs; ``rec`` gets the step times, their median, tokens/s and both MFUs, rewritten
    after every step), then one profiled step unless ``profile`` is false. Returns the profile."""
    reset_gpu_peak(device)
    for i in range(warmup):
        t = time.perf_counter()
        loss = step()
        sync(device)
        log(f"warmup {i + 1}/{warmup}: {time.perf_counter() - t:.3f} s loss={loss_value(loss):.4f} "
            f"{mem_line(device)}", rank)
    rec["status"] = "warmup_done"
    writer.write()
    times = []
    for i in range(steps):
        sync(device)
        t = time.perf_counter()
        loss = step()
        sync(device)
        dt = time.perf_counter() - t
        times.append(dt)
        rec.update(step_times_s=times, loss=loss_value(loss))
        fill_rates(rec, times, tokens_per_step, fpt, fpt_c, peak, world)
        rec.update(gpu_memory(device), **host_memory())
        writer.write()
        log(f"step {i + 1}/{steps}: {dt:.3f} s  loss={rec['loss']:.4f}  {rec['tokens_per_s']:.4g} tok/s  "
            f"{mem_line(device)}", rank)
    rec["status"] = "timed_done"
    if not profile:
        return None
    log("profiling one step", rank)
    prof = profile_step(step, device, trace_dir=trace_dir, keep_trace=bool(trace_dir))
    rec["profile"] = prof
    return prof


def record_peaks(rec: dict, device) -> None:
    """This rank's memory into ``rec``, with the peaks over all ranks (GPU: the largest; host RSS:
    the largest and the sum)."""
    mem = gpu_memory(device)
    host = host_memory()
    peaks = gather_across_ranks(mem["peak_gpu_mem_gib"])
    rss = gather_across_ranks(host["peak_host_rss_gib"])
    rec.update(mem, **host)
    if peaks and all(p is not None for p in peaks):
        rec["peak_gpu_mem_gib_all_ranks"] = peaks
        rec["peak_gpu_mem_gib"] = max(peaks)
    rec["peak_host_rss_gib_all_ranks"] = rss
    rec["peak_host_rss_gib"] = max(rss)
    rec["peak_host_rss_gib_sum_ranks"] = sum(rss)


def record_failure(rec: dict, e: BaseException, out, rank: int, who: str, status: str | None = None,
                   first_only: bool = True) -> int:
    """Turn a failure into the record (``status``, else interrupted / OOM / error; memory at the
    time) and write it -- with ``first_only``, only if no other rank failed first (the root cause:
    an OOM on one rank, not the others' fallout; ``alst_baseline --optimizer auto`` decides on this
    record). Returns the exit code: 3 for a run that did not fit (OOM, no_fit), else 1."""
    import traceback

    if status is None:
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else ("OOM" if is_oom(e) else "error")
    rec.update(status=status, error=short_error(e), failed_rank=rank, traceback=traceback.format_exc()[-4000:])
    try:
        import torch

        if torch.cuda.is_available():
            rec.update(gpu_memory(torch.device("cuda", torch.cuda.current_device())))
    except Exception:  # noqa: BLE001
        pass
    rec.update(host_memory())
    if out and not (first_only and failed_elsewhere(Path(out))):
        try:
            write_json_atomic(Path(out), rec)
        except Exception:  # noqa: BLE001
            pass
    print(f"[{who} r{rank}] {status}: {short_error(e, 500)}", file=sys.stderr, flush=True)
    if status == "error":
        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    return 3 if status in ("OOM", "no_fit") else 1


def shutdown_distributed() -> None:
    """End the process group after a run that went well (a barrier first, so no rank leaves early)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


def launcher_device(requested: str):
    """(rank, world, local_rank, device) of a worker started by torchrun (or alone), on the GPU of
    its local rank unless ``requested`` (--device) is "cpu"; "cuda" without a GPU is an error."""
    import torch

    ensure_launcher_env()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_gpu = requested != "cpu" and torch.cuda.is_available()
    if requested == "cuda" and not on_gpu:
        raise RuntimeError("--device cuda but torch sees no GPU")
    device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    return rank, world, local_rank, device
