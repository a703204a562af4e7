"""Throughput and memory of one longtrain training configuration.

One command per configuration (one process per GPU, as in training)::

    torchrun --nproc_per_node=2 bench/bench_train.py --config llama3-8b --seq-len 131072 --sp 2 \
        --policy auto --steps 5 --warmup 2 --out result.json [section.key=value ...]

builds the job through the normal path (``longtrain.config.load_config`` ->
``longtrain.trainer.train.setup``) on synthetic tokens, runs ``--warmup`` untimed steps and
``--steps`` timed ones (each a full step: data, forward, backward, clip, optimizer), then one more
under ``torch.profiler``, and writes one JSON record (schema in ``bench/common.py``, shared with
``alst_baseline.py``): tokens/s (global and per GPU), median step time, MFU by the non-causal and
causal FLOP counts (``trainer/metrics.py``), peak GPU memory (max over ranks) and peak host RSS,
and the share of the profiled step spent in attention kernels, NCCL kernels and device<->host
copies. ``--planner`` adds the memory planner's estimate beside the measured peak.

The record is rewritten after every phase, so a run stopped by its time limit still says how far
it got. An out-of-memory error on any rank writes ``status: "OOM"`` and exits with code 3 (the
launcher then stops the other ranks); the planner refusing the length (``memory.policy=auto``,
"no memory policy fits") writes ``status: "no_fit"`` and exits 3; other failures write
``status: "error"`` and exit 1.

``--device cpu --tiny`` shrinks the model and sequence so the whole path runs on a CPU in seconds
(the smoke test in tests/test_bench_smoke.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

# before torch touches CUDA: less fragmentation at long sequence lengths (ALST uses the same)
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))  # run as a script from anywhere: `import longtrain` finds the checkout
_BENCH = Path(__file__).resolve().parent
if str(_BENCH) not in sys.path:
    sys.path.insert(0, str(_BENCH))

import common  # noqa: E402  (bench/common.py)

TINY_MODEL = ["model.vocab_size=264", "model.dim=128", "model.n_heads=4", "model.n_kv_heads=2",
              "model.ffn_dim=352", "model.n_layers=2", "model.n_prelude=1", "model.n_core=1",
              "model.n_coda=1", "model.loops=2", "model.loops_max=4"]


def parse_seq_len(text: str) -> int:
    """``131072``, ``128K``, ``1M`` (K = 1024, M = 1024**2)."""
    t = str(text).strip().upper().replace("_", "")
    mult = 1
    if t.endswith("K"):
        mult, t = 1024, t[:-1]
    elif t.endswith("M"):
        mult, t = 1024 * 1024, t[:-1]
    try:
        return int(float(t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seq-len {text!r} is not a length; give e.g. 131072, 128K or 1M") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="llama3.2-1b", help="shipped config name or YAML path")
    p.add_argument("--seq-len", type=parse_seq_len, default=None, help="tokens per sequence (global, before sp)")
    p.add_argument("--sp", type=int, default=None, help="Ulysses sequence-parallel size (parallel.sp)")
    p.add_argument("--policy", choices=["auto", "manual", "leanest"], default=None,
                   help="memory.policy: auto = the planner picks recompute/offload/tiling; manual = "
                        "the memory.* keys given as overrides; leanest = the last rung of the planner's "
                        "ladder whatever it estimates (a real trial past the planner's reach; it replaces "
                        "the policy's memory.* keys)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per data-parallel rank (data.batch_size)")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--out", default=None, help="JSON result path (rewritten after every phase)")
    p.add_argument("--planner", action="store_true", help="print the memory planner's estimate next to the measured peak")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--tiny", action="store_true", help="tiny model and sequence (CPU smoke)")
    p.add_argument("--no-profile", action="store_true", help="skip the profiled step")
    p.add_argument("--trace-dir", default=None, help="keep the profiler's Chrome trace here")
    p.add_argument("--doc-masking", action="store_true",
                   help="packed documents with block-diagonal attention (default off: plain causal "
                        "attention over the whole sequence, as the ALST baseline computes)")
    p.add_argument("--no-kernel-rates", action="store_true",
                   help="skip the matmul and attention microbenchmarks at start (the ideal step time)")
    common.add_gpu_cap_arg(p)
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides (applied last)")
    return p


def build_overrides(args) -> list[str]:
    ov = ["data.source=synthetic", "schedule.eval_every=0", f"data.doc_masking={str(args.doc_masking).lower()}",
          "logging.progress=false", "logging.tensorboard=false", "checkpoint.save_final=false"]
    if args.tiny:
        ov += TINY_MODEL + ["data.seq_len=256", "data.batch_size=2"]
    if args.seq_len is not None:
        ov.append(f"data.seq_len={args.seq_len}")
    if args.sp is not None:
        ov.append(f"parallel.sp={args.sp}")
    if args.policy is not None:
        ov.append(f"memory.policy={'manual' if args.policy == 'leanest' else args.policy}")
    if args.batch_size is not None:
        ov.append(f"data.batch_size={args.batch_size}")
    if args.device != "auto":
        ov.append(f"schedule.device={args.device}")
    if args.device == "cpu":
        ov += ["schedule.dtype=fp32", "parallel.backend=gloo"]
    total = args.warmup + args.steps + (0 if args.no_profile else 1)
    ov += [f"schedule.steps={max(total, 1)}", "schedule.warmup_steps=0"]
    if args.gpu_cap_gb:  # the planner plans for the capped card (an explicit budget still wins)
        ov.append(f"memory.gpu_budget_gb={args.gpu_cap_gb:g}")
    return ov + list(args.overrides)


def load_bench_config(args):
    """The config the run uses: file <- bench settings <- user overrides, with max_seq_len raised
    to the benchmark's sequence length where the file's is shorter."""
    from longtrain.config import load_config

    ov = build_overrides(args)
    probe = load_config(args.config, [o for o in ov if not o.startswith("data.seq_len=")])
    seq = probe.data.seq_len
    for o in ov:
        if o.startswith("data.seq_len="):
            seq = int(o.split("=", 1)[1])
    if seq > probe.model.max_seq_len:
        ov.insert(0, f"model.max_seq_len={seq}")
    cfg = load_config(args.config, ov)
    if args.policy == "leanest":
        from longtrain.memory.planner import candidate_policies, layout_from

        world = int(os.environ.get("WORLD_SIZE", "1"))
        candidate_policies(cfg, layout_from(cfg, world))[-1].apply_to(cfg.memory)
    return cfg


# --------------------------------------------------------------------------------------------
# Planner: its memory and step-time estimate for the policy this run resolved to
# --------------------------------------------------------------------------------------------


def planner_estimate(cfg, dims) -> dict:
    """The planner's estimate for ``cfg`` (already resolved) on ``dims``: peak GiB by term, host
    GiB, and the step-time model's seconds by term (``memory.step_time``)."""
    from longtrain.memory.planner import layout_from
    from longtrain.memory.step_memory import estimate, policy_of

    est = estimate(cfg, layout_from(cfg, dims), policy_of(cfg.memory))
    return {"available": True, "policy": est.policy.name,
            "peak_gib": est.gpu_total / 2**30, "host_gib": est.host_total / 2**30,
            "gpu_terms_gib": {k: v / 2**30 for k, v in est.gpu.items()},
            "host_terms_gib": {k: v / 2**30 for k, v in est.host.items()},
            "step_s": est.time.total, "ideal_step_s": est.time.ideal,
            "step_terms_s": dict(est.time.terms)}


# --------------------------------------------------------------------------------------------
# The step (the same sequence of calls as the loop in trainer/train.py)
# --------------------------------------------------------------------------------------------


def make_step(cfg, dims, model, optimizer, scheduler, loader, timings: dict):
    from longtrain.models import sample_loops
    from longtrain.parallel.reduce import clip_grad_norm_
    from longtrain.trainer.stability import StabilityMonitor
    from longtrain.trainer.step import forward_backward

    looped = cfg.model.arch == "looped"
    state = {"step": 0}
    monitor = StabilityMonitor(model, cfg.logging, dims)  # logging.stability_every=N measures its cost

    def step():
        t0 = time.perf_counter()
        batches = [next(loader) for _ in range(cfg.schedule.grad_accum)]
        t1 = time.perf_counter()
        n_loops = sample_loops(cfg.model, state["step"], cfg.schedule.seed, training=True) if looped else None
        monitor.begin(state["step"])
        loss, n_tok = forward_backward(model, batches, dims, cfg, n_loops)
        monitor.after_backward()
        clip_grad_norm_(model.parameters(), cfg.optim.grad_clip, dims)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        state["step"] += 1
        if (stability := monitor.end(state["step"])) is not None:
            timings["stability"] = stability
        timings["data_s"] = t1 - t0
        timings["loss"] = loss
        timings["n_loops"] = n_loops
        return loss

    return step


def run(args, writer: common.ResultWriter, rec: dict) -> dict:
    import torch

    from longtrain.models.costs import flops_per_token
    from longtrain.trainer.metrics import device_peak_flops
    from longtrain.trainer.train import setup

    cfg = load_bench_config(args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    common.maybe_simulate_oom(cfg.data.seq_len)
    rec.update(config=args.config + (" (tiny)" if args.tiny else ""), seq_len=cfg.data.seq_len,
               world_size=world, sp=cfg.parallel.sp, batch_size=cfg.data.batch_size, steps=args.steps,
               warmup=args.warmup, alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
               overrides=build_overrides(args))
    common.log(f"config {args.config}: seq_len={cfg.data.seq_len} sp={cfg.parallel.sp} "
               f"policy={cfg.memory.policy} world={world}; setting up", rank)
    if args.gpu_cap_gb:  # before the first CUDA allocation
        on_gpu = cfg.schedule.device != "cpu" and torch.cuda.is_available()
        local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if on_gpu else torch.device("cpu")
        rec.update(common.apply_gpu_cap(args.gpu_cap_gb, local))
    if not args.no_kernel_rates:
        rec["kernel_rates"] = measure_kernel_rates(cfg, rank)
    t0 = time.perf_counter()
    cfg, dims, model, optimizer, scheduler, loader, _ = setup(cfg)
    setup_s = time.perf_counter() - t0
    rank = dims.rank
    writer.enabled = writer.enabled and dims.is_main
    n_params = sum(p.numel() for p in model.parameters())  # local (sharded) count under FSDP
    rec.update(status="setup_done", setup_s=setup_s, device=common.device_name(dims.device),
               world_size=dims.world_size, sp=dims.sp_size, dp=dims.dp_size,
               resolved_memory=dataclasses.asdict(cfg.memory), parallel=dims.describe(),
               local_params=n_params)
    from longtrain.models.attention import describe_backends

    rec["attention_backend"] = describe_backends(cfg.model.attn_backend, dims.device)
    rec["configuration"] = describe_configuration(cfg, dims, args.policy)
    writer.write()
    common.log(f"setup {setup_s:.1f} s; {dims.describe()}; {rec.get('attention_backend', '')}; "
               f"memory policy: {dataclasses.asdict(cfg.memory)}", rank)

    plan = planner_estimate(cfg, dims) if args.planner else None
    if plan is not None:
        rec["planner"] = plan
        common.log(f"planner: {plan}", rank)

    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * dims.dp_size * cfg.schedule.grad_accum
    peak, peak_src = device_peak_flops(dims.device)
    fpt = flops_per_token(cfg.model, cfg.data.seq_len, causal=False)
    fpt_c = flops_per_token(cfg.model, cfg.data.seq_len, causal=True)
    rec.update(tokens_per_step=tokens_per_step, peak_flops=peak, peak_flops_source=peak_src,
               flops_per_token=fpt, flops_per_token_causal=fpt_c)

    timings: dict = {}
    step = make_step(cfg, dims, model, optimizer, scheduler, loader, timings)
    common.reset_gpu_peak(dims.device)

    for i in range(args.warmup):
        t = time.perf_counter()
        loss = step()
        common.sync(dims.device)
        common.log(f"warmup {i + 1}/{args.warmup}: {time.perf_counter() - t:.3f} s loss={float(loss):.4f} "
                   f"{common.mem_line(dims.device)}", rank)
    rec["status"] = "warmup_done"
    writer.write()

    times, data_times = [], []
    for i in range(args.steps):
        common.sync(dims.device)
        t = time.perf_counter()
        loss = step()
        common.sync(dims.device)
        dt = time.perf_counter() - t
        times.append(dt)
        data_times.append(timings.get("data_s", 0.0))
        rec.update(step_times_s=times, data_times_s=data_times, loss=float(loss))
        common.fill_rates(rec, times, tokens_per_step, fpt, fpt_c, peak, dims.world_size)
        rec.update(common.gpu_memory(dims.device), **common.host_memory())
        writer.write()
        common.log(f"step {i + 1}/{args.steps}: {dt:.3f} s  loss={float(loss):.4f}  "
                   f"{rec['tokens_per_s']:.4g} tok/s  {common.mem_line(dims.device)}", rank)

    rec["status"] = "timed_done"
    prof = None
    if not args.no_profile:
        common.log("profiling one step", rank)
        prof = common.profile_step(step, dims.device, trace_dir=args.trace_dir, keep_trace=bool(args.trace_dir))
        rec["profile"] = prof

    common.record_peaks(rec, dims.device)
    common.add_ideal(rec, cfg.model, dims.world_size)
    if plan is not None and plan.get("peak_gib") is not None and rec.get("peak_gpu_mem_gib") is not None:
        plan["measured_peak_gib"] = rec["peak_gpu_mem_gib"]
        plan["estimate_over_measured"] = plan["peak_gib"] / max(rec["peak_gpu_mem_gib"], 1e-9)
    if plan is not None and rec.get("step_time_s_median"):
        plan["step_model_over_measured"] = plan["step_s"] / rec["step_time_s_median"]
    rec["status"] = "ok"
    writer.write()
    if dims.is_main:
        common.print_profile(prof or {})
        common.print_ideal(rec)
        if plan is not None:
            est, meas = plan.get("peak_gib"), rec.get("peak_gpu_mem_gib")
            print(f"[bench] planner estimate {'-' if est is None else f'{est:.2f}'} GiB vs measured peak "
                  f"{'-' if meas is None else f'{meas:.2f}'} GiB (reserved {rec.get('peak_gpu_reserved_gib')}); "
                  f"{plan.get('policy') or ''} {plan.get('reason') or ''}", flush=True)
            for k, v in (plan.get("gpu_terms_gib") or {}).items():
                print(f"    {k:20s} {v:8.2f} GiB", flush=True)
            step = rec.get("step_time_s_median")
            print(f"[bench] step-time model {plan['step_s']:.2f} s vs measured "
                  f"{'-' if step is None else f'{step:.2f}'} s; terms: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in plan["step_terms_s"].items()), flush=True)
        common.print_table([rec])
    return rec


def measure_kernel_rates(cfg, rank: int) -> dict:
    """The matmul and causal attention rates on this GPU, before the model takes its memory: the
    attention kernel plain causal attention resolves to, at the per-GPU head shape (Ulysses: heads / sp
    over the whole sequence)."""
    import torch

    from longtrain.models.attention import select_backend

    on_gpu = cfg.schedule.device != "cpu" and torch.cuda.is_available()
    if not on_gpu:
        return {"skipped": "no GPU"}
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    m, sp = cfg.model, max(1, cfg.parallel.sp)
    backend = select_backend(m.attn_backend, device, has_docs=cfg.data.doc_masking)
    sdpa = {"sdpa": "default", "sdpa_cudnn": "cudnn", "sdpa_flash": "flash", "sdpa_math": "math"}.get(backend)
    if sdpa is None:
        return {"skipped": f"attention backend {backend} has no microbenchmark here (SDPA kernels only)"}
    rates = common.kernel_rates(device, max(1, m.n_heads // sp), max(1, m.n_kv_heads // sp), m.head_dim,
                                attn_backend=sdpa, attn_seq=min(cfg.data.seq_len, 32768))
    common.log(f"kernel rates: {rates}", rank)
    return rates


def describe_configuration(cfg, dims, requested_policy: str | None = None) -> str:
    """One line naming what this run used: parallel layout and the memory policy it resolved to
    (``requested_policy``: --policy, so a planner's pick says so)."""
    mem = cfg.memory
    pol = {"auto": "auto (planner's pick)", "leanest": "leanest (forced)"}.get(requested_policy, mem.policy)
    parts = [f"sp={dims.sp_size} dp={dims.dp_size}", f"policy={pol}", f"recompute={mem.recompute}"]
    if mem.recompute_layers:
        parts.append(f"layers={','.join(map(str, mem.recompute_layers))}")
    if mem.offload:
        parts.append(f"act_offload={mem.offload_fraction:g}")
    if mem.tiled_mlp:
        parts.append(f"tiled_mlp={mem.tiled_mlp}")
    if mem.tiled_loss:
        parts.append(f"tiled_loss={mem.tiled_loss}")
    parts.append("opt=cpu" if mem.optimizer_offload else "opt=gpu")
    if mem.fsdp_cpu_offload:
        parts.append("fsdp_cpu_offload")
    from longtrain.models.attention import select_backend

    parts.append(f"attn={select_backend(cfg.model.attn_backend, dims.device, has_docs=cfg.data.doc_masking)}")
    return " ".join(parts)


def main(argv=None) -> int:
    # the planner refusing before anything ran (memory.policy=auto) is its own status; any failing
    # rank writes: the launcher stops the others, and rank 0 may be one of them
    return common.run_main("longtrain", "bench", run, build_parser().parse_args(argv), argv,
                           status_of=lambda e: "no_fit" if "no memory policy fits" in str(e) else None,
                           first_only=False)


if __name__ == "__main__":
    sys.exit(main())
