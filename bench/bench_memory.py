"""Memory policies on one GPU: step time, measured peak memory next to the planner's estimate.

For one model shape and sequence length, runs a few training steps (forward, backward, AdamW)
under each policy -- ``none``, ``full`` recompute, ``full+offload``, ``auto`` (the planner's
choice for this GPU) and any ``--policy NAME=key=value,key=value`` you add -- and reports median
step time, tokens/s, peak GPU memory allocated (``torch.cuda.max_memory_allocated``) beside the
planner's estimate, and the process's host RSS. ``--find-max-seq POLICY`` doubles the sequence
length until a step runs out of memory, then bisects to the longest that trains.

Usage (Llama-3.2-1B shape is the default):
    python bench/bench_memory.py --seq 32768 --out bench_memory.json
    python bench/bench_memory.py --find-max-seq auto --seq 65536
    python bench/bench_memory.py --device cpu --tiny           # smoke test without a GPU
Results go to docs/performance.md with device, date and command.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from longtrain.config import load_config  # noqa: E402
from longtrain.memory import apply_activation_memory  # noqa: E402
from longtrain.memory.optimizer_offload import build_optimizer  # noqa: E402
from longtrain.memory.planner import (GiB, host_rss_bytes, measure_peak, reset_peak, resolve_policy,  # noqa: E402
                                      sizes)
from longtrain.memory.step_memory import estimate, policy_of  # noqa: E402
from longtrain.models import build_model  # noqa: E402

BUILTIN = {
    "none": [],
    "full": ["memory.recompute=full"],
    "full+offload": ["memory.recompute=full", "memory.offload=true"],
    "full+offload+tiled": ["memory.recompute=full", "memory.offload=true", "memory.tiled_mlp=16",
                           "memory.tiled_loss=4096"],
    "auto": ["memory.policy=auto"],
}

TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128",
        "model.vocab_size=512", "model.tie_embeddings=false"]
SHAPE = ["model.arch=llama", "model.dim={dim}", "model.n_layers={layers}", "model.n_heads={heads}",
         "model.n_kv_heads={kv}", "model.ffn_dim={ffn}", "model.vocab_size={vocab}", "model.tie_embeddings=true",
         "model.rope_theta=500000"]


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def make_cfg(args, policy_overrides: list[str], seq: int):
    over = (TINY if args.tiny else [s.format(**vars(args)) for s in SHAPE])
    over += [f"data.seq_len={seq}", f"data.batch_size={args.batch}", f"model.max_seq_len={max(seq, 8192)}",
             f"schedule.dtype={'bf16' if args.device == 'cuda' else 'fp32'}", f"model.attn_backend={args.attn}",
             f"memory.host_budget_gb={args.host_budget_gb}", f"memory.gpu_budget_gb={args.gpu_budget_gb}",
             "data.source=synthetic"]
    cfg = load_config(None, over + policy_overrides)
    if cfg.memory.policy == "auto":
        cfg = resolve_policy(cfg, {"dp_shard": 1, "dp_replicate": 1, "tp": 1, "sp": 1, "pp": 1})
    return cfg


def run_policy(args, name: str, overrides: list[str], seq: int, steps: int) -> dict:
    """Train ``steps`` steps; the record holds times, memory and the planner's estimate."""
    dev = torch.device(args.device)
    rec = {"policy": name, "seq_len": seq, "batch": args.batch, "status": "starting"}
    model = opt = None
    try:
        cfg = make_cfg(args, overrides, seq)
        mem = cfg.memory
        rec["resolved"] = {k: getattr(mem, k) for k in ("recompute", "recompute_loops", "offload",
                                                          "offload_fraction", "tiled_mlp", "tiled_loss",
                                                          "optimizer_offload")}
        est = estimate(cfg, sizes(), policy_of(mem))
        rec["estimate_gpu_gib"] = est.gpu_total / GiB
        rec["estimate_host_gib"] = est.host_total / GiB
        rec["estimate_terms_gib"] = {k: v / GiB for k, v in est.gpu.items()}
        torch.manual_seed(0)
        with torch.device("meta"):
            model = build_model(cfg.model)
        model = model.to_empty(device=dev)
        model.init_weights()
        apply_activation_memory(model, cfg)
        opt = build_optimizer(model, cfg)
        g = torch.Generator(device="cpu").manual_seed(0)
        tokens = torch.randint(0, cfg.model.vocab_size, (args.batch, seq), generator=g).to(dev)
        labels = tokens.roll(-1, dims=1)
        n_tok = args.batch * seq
        amp = (torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda"
               else torch.autocast("cpu", enabled=False))
        reset_peak(dev if dev.type == "cuda" else None)
        rss0 = host_rss_bytes()
        times, loss = [], None
        for i in range(steps + args.warmup):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with amp:
                loss = model(tokens, labels=labels) / n_tok
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        peak = measure_peak(dev if dev.type == "cuda" else None)
        med = statistics.median(times)
        rec.update(status="ok", loss=float(loss.detach()), step_time_s=med, tokens_per_s=n_tok / med,
                   peak_gpu_gib=None if peak["gpu_peak_allocated"] is None else peak["gpu_peak_allocated"] / GiB,
                   peak_gpu_reserved_gib=None if peak["gpu_peak_reserved"] is None else peak["gpu_peak_reserved"] / GiB,
                   host_rss_gib=peak["host_rss"] / GiB, host_rss_growth_gib=(peak["host_rss"] - rss0) / GiB)
        off = getattr(model, "_longtrain_offloader", None)
        if off is not None:
            rec["offload_stats"] = {**off.stats, **off.pool.stats()}
        if hasattr(opt, "impl_name"):
            rec["optimizer"] = opt.impl_name
    except Exception as e:  # noqa: BLE001 - a benchmark records failures and goes on
        rec["status"] = "oom" if is_oom(e) else "error"
        rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    finally:
        del model, opt
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rec


def find_max_seq(args, name: str, overrides: list[str]) -> dict:
    """Double from ``--seq`` until a step fails, then bisect to ``--seq-granularity``."""
    trials = []
    ok, bad, seq = 0, None, args.seq
    while seq <= args.max_seq:
        r = run_policy(args, name, overrides, seq, steps=1)
        trials.append(r)
        print(f"  seq={seq:>9}: {r['status']}", flush=True)
        if r["status"] != "ok":
            if r["status"] == "error":
                return {"policy": name, "max_seq_len": ok or None, "trials": trials, "error": r["error"]}
            bad = seq
            break
        ok, seq = seq, seq * 2
    while bad is not None and bad - ok > args.seq_granularity:
        mid = (ok + bad) // 2 // args.seq_granularity * args.seq_granularity
        if mid <= ok:
            break
        r = run_policy(args, name, overrides, mid, steps=1)
        trials.append(r)
        print(f"  seq={mid:>9}: {r['status']}", flush=True)
        ok, bad = (mid, bad) if r["status"] == "ok" else (ok, mid)
    return {"policy": name, "max_seq_len": ok or None, "first_failure": bad, "trials": trials}


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def print_table(rows: list[dict]) -> None:
    print(f"{'policy':<20} {'seq':>8} {'status':>6} {'step s':>8} {'tok/s':>10} {'peak GiB':>9} "
          f"{'est GiB':>8} {'host RSS':>9}")
    for r in rows:
        print(f"{r['policy']:<20} {r['seq_len']:>8} {r['status']:>6} {fmt(r.get('step_time_s'), '.3f'):>8} "
              f"{fmt(r.get('tokens_per_s'), '.0f'):>10} {fmt(r.get('peak_gpu_gib')):>9} "
              f"{fmt(r.get('estimate_gpu_gib')):>8} {fmt(r.get('host_rss_gib')):>9}"
              + (f"  {r['error']}" if r.get("error") else ""))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="a 2-layer toy shape (CPU smoke test)")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv", type=int, default=8)
    p.add_argument("--ffn", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 32768; 256 with --tiny)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--attn", default="auto")
    p.add_argument("--policies", default="none,full,full+offload,auto",
                   help=f"comma-separated, from {list(BUILTIN)} or names given with --policy")
    p.add_argument("--policy", action="append", default=[], metavar="NAME=key=value,...",
                   help="an extra policy, e.g. 'sel=memory.recompute=selective,memory.tiled_loss=4096'")
    p.add_argument("--find-max-seq", metavar="POLICY", default=None)
    p.add_argument("--max-seq", type=int, default=1 << 24)
    p.add_argument("--seq-granularity", type=int, default=4096)
    p.add_argument("--host-budget-gb", type=float, default=64.0)
    p.add_argument("--gpu-budget-gb", type=float, default=0.0)
    p.add_argument("--out", default="bench_memory.json")
    args = p.parse_args(argv)
    if args.seq is None:
        args.seq = 256 if args.tiny else 32768
    if args.tiny and args.seq_granularity > args.seq:
        args.seq_granularity = max(1, args.seq // 4)
    policies = dict(BUILTIN)
    for spec in args.policy:
        name, _, rest = spec.partition("=")
        policies[name] = [s for s in rest.split(",") if s]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    result = {"device": device_name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "command": " ".join([sys.executable, *sys.argv]), "shape": "tiny" if args.tiny else
              {k: getattr(args, k) for k in ("dim", "layers", "heads", "kv", "ffn", "vocab")}}
    if args.find_max_seq:
        if args.find_max_seq not in policies:
            p.error(f"--find-max-seq {args.find_max_seq!r}: unknown policy; known: {list(policies)}")
        r = find_max_seq(args, args.find_max_seq, policies[args.find_max_seq])
        result["find_max_seq"] = r
        print(f"longest sequence that trains with {args.find_max_seq}: {r['max_seq_len']}")
    else:
        rows = []
        names = [s for s in args.policies.split(",") if s]
        names += [spec.partition("=")[0] for spec in args.policy if spec.partition("=")[0] not in names]
        for name in names:  # the listed policies, then every --policy given
            if name not in policies:
                p.error(f"policy {name!r} unknown; known: {list(policies)}")
            print(f"[bench_memory] {name} seq={args.seq} ...", flush=True)
            rows.append(run_policy(args, name, policies[name], args.seq, args.steps))
        result["runs"] = rows
        print(f"\ndevice: {device_name}")
        print_table(rows)
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {args.out}")
    bad = [r for r in result.get("runs", []) if r["status"] == "error"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
