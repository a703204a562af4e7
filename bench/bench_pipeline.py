"""Pipeline bubble per schedule: how much of a training step each pipeline rank sits idle.

Run on 2 GPUs (the lead's measurement)::

    torchrun --nproc_per_node=2 bench/bench_pipeline.py --out bubble.json

CPU smoke test (gloo, tiny model; checks the script, not the numbers)::

    torchrun --nproc_per_node=2 bench/bench_pipeline.py --device cpu --out /tmp/bubble.json

Method: for each schedule (GPipe, 1F1B, interleaved 1F1B; optionally zero bubble) the same Llama
is split with ``parallel.pipeline.build_pipeline`` and stepped ``--steps`` times after
``--warmup``. Every stage's compute calls (``forward_one_chunk``, ``backward_one_chunk``,
``backward_weight_one_chunk``) are timed -- with CUDA events on GPU (read after the step's
synchronize), wall clock on CPU -- and the step is timed between a barrier and a device
synchronize. ``busy`` is a rank's summed compute time in the step; ``bubble = 1 - busy / step``
is its idle fraction (waiting on point-to-point transfers, i.e. the pipeline bubble plus
unhidden communication). The textbook bubble ``(p - 1) / (v m + p - 1)`` (p ranks, m
micro-batches, v stages per rank) is written next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--out", default="bubble.json")
    ap.add_argument("--schedules", default="gpipe,1f1b,interleaved_1f1b",
                    help=f"comma-separated, from {SCHEDULES}")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10 GPU, 3 CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3 GPU, 1 CPU)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--dim", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None, help="rows per step (cut into micro-batches)")
    ap.add_argument("--microbatches", type=int, default=None)
    ap.add_argument("--virtual-stages", type=int, default=2)
    return ap.parse_args()


def defaults(args) -> None:
    gpu = args.device == "cuda"
    for key, g, c in (("steps", 10, 3), ("warmup", 3, 1), ("layers", 16, 4), ("dim", 2048, 64),
                      ("seq", 4096, 64), ("batch", 16, 8), ("microbatches", 8, 4)):
        if getattr(args, key) is None:
            setattr(args, key, g if gpu else c)


def make_config(args, schedule: str):
    from longtrain.config import load_config

    heads = max(4, args.dim // 128)
    over = ["model.arch=llama", f"model.n_layers={args.layers}", f"model.dim={args.dim}",
            f"model.n_heads={heads}", f"model.n_kv_heads={max(1, heads // 4)}",
            f"model.ffn_dim={int(args.dim * 8 / 3) // 64 * 64 or 64}", "model.vocab_size=32000"
            if args.device == "cuda" else "model.vocab_size=256",
            f"model.max_seq_len={args.seq}", f"data.seq_len={args.seq}", f"data.batch_size={args.batch}",
            f"parallel.pp={int(os.environ['WORLD_SIZE'])}", f"parallel.pp_schedule={schedule}",
            f"parallel.pp_microbatches={args.microbatches}", f"parallel.pp_virtual_stages={args.virtual_stages}",
            f"schedule.device={args.device}", "schedule.dtype=" + ("bf16" if args.device == "cuda" else "fp32"),
            "parallel.backend=" + ("nccl" if args.device == "cuda" else "gloo"), "parallel.dp_shard=1"]
    return load_config(None, over)


class StageTimer:
    """Wraps each stage's compute calls; ``busy_s()`` is their summed time in the current step."""

    def __init__(self, stages, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list = []
        for stage in stages:
            for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
                if hasattr(stage, name):
                    setattr(stage, name, self._wrap(getattr(stage, name)))

    def _wrap(self, fn):
        def timed(*a, **k):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn(*a, **k)
                end.record()
                self.spans.append((start, end))
            else:
                t0 = time.perf_counter()
                out = fn(*a, **k)
                self.spans.append(time.perf_counter() - t0)
            return out

        return timed

    def reset(self) -> None:
        self.spans.clear()

    def busy_s(self) -> float:
        if self.cuda:
            return sum(s.elapsed_time(e) for s, e in self.spans) / 1e3
        return float(sum(self.spans))


def bench_schedule(args, schedule: str, dims_holder: dict) -> dict:
    from longtrain.models import build_model
    from longtrain.parallel import init_distributed
    from longtrain.parallel.pipeline import build_pipeline

    cfg = make_config(args, schedule)
    if "dims" not in dims_holder:
        dims_holder["dims"] = init_distributed(cfg)
    dims = dims_holder["dims"]
    torch.manual_seed(0)
    with torch.device(dims.device):
        model = build_model(cfg.model)
    pm = build_pipeline(model, dims, cfg)
    del model
    timer = StageTimer(pm.stages, dims.device)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq), generator=g)
    batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1),
             "position_ids": torch.arange(args.seq).expand(args.batch, -1).contiguous()}
    n = torch.tensor(float(tokens.numel()), dtype=torch.float64, device=dims.device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if dims.device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    steps, busy = [], []
    for i in range(args.warmup + args.steps):
        dist.barrier()
        if dims.device.type == "cuda":
            torch.cuda.synchronize()
        timer.reset()
        t0 = time.perf_counter()
        with autocast:
            pm.step([batch], n)
        if dims.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        for p in pm.parameters():
            p.grad = None
        if i >= args.warmup:
            steps.append(dt)
            busy.append(timer.busy_s())
    fractions = [1 - b / s for b, s in zip(busy, steps)]
    p, m = dims.pp, pm.n_microbatches
    v = len(pm.specs) // p
    mine = {"rank": dims.pp_rank, "stages": [s.stage_index for s in pm.stages],
            "step_time_s_median": statistics.median(steps), "busy_s_median": statistics.median(busy),
            "bubble_fraction_median": statistics.median(fractions), "bubble_fraction_all": fractions}
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, mine)
    result = {"schedule": schedule, "schedule_class": type(pm.schedule).__name__, "pp": p,
              "stages_per_rank": v, "microbatches": m,
              "theoretical_bubble": (p - 1) / (v * m + p - 1),
              "step_time_s_median": max(r["step_time_s_median"] for r in per_rank),
              "bubble_fraction_mean": statistics.mean(r["bubble_fraction_median"] for r in per_rank),
              "per_rank": per_rank, "stages": pm.describe()}
    del pm, timer
    if dims.device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    args = parse_args()
    defaults(args)
    if "WORLD_SIZE" not in os.environ:
        raise SystemExit("start with torchrun, e.g. torchrun --nproc_per_node=2 bench/bench_pipeline.py "
                         "[--device cpu] --out bubble.json")
    if args.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ["WORLD_SIZE"])))
    holder: dict = {}
    results = []
    for schedule in args.schedules.split(","):
        if schedule not in SCHEDULES:
            raise SystemExit(f"--schedules: {schedule!r} is not one of {SCHEDULES}")
        r = bench_schedule(args, schedule, holder)
        results.append(r)
        if dist.get_rank() == 0:
            print(f"[bench_pipeline] {schedule:17s} step {r['step_time_s_median'] * 1e3:8.1f} ms  "
                  f"bubble measured {r['bubble_fraction_mean']:.3f}  theory {r['theoretical_bubble']:.3f}  "
                  f"(per rank: " + ", ".join(f"{x['bubble_fraction_median']:.3f}" for x in r["per_rank"]) + ")",
                  flush=True)
    if dist.get_rank() == 0:
        dims = holder["dims"]
        record = {"device": (torch.cuda.get_device_name(dims.device) if dims.device.type == "cuda" else "cpu"),
                  "world_size": dist.get_world_size(), "torch": torch.__version__,
                  "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "args": vars(args), "results": results}
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
        print(f"[bench_pipeline] wrote {args.out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
