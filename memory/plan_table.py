"""What ``longtrain plan`` prints: the planner's rows with their memory terms and step time, and
the step-time model against every measured step.

Owns: ``format_plan`` (the table, fastest first, one row per policy family: the fastest offload
fraction that fits, else the leanest), ``shown_rows`` (which rows), ``time_model_error`` and
``format_time_model_error`` (``memory.step_time.MEASURED`` through the planner's own estimate).
The estimates themselves are ``memory.step_memory``'s, the choice ``memory.planner``'s.
"""

from __future__ import annotations

import dataclasses

from longtrain.config import Config, load_config
from longtrain.memory.planner import (GiB, OFFLOAD_STEPS, RESERVE_BYTES, RESERVE_FRACTION, Plan, fits, layout_from,
                                      tiling_sizes, usable)
from longtrain.memory.step_memory import Policy, act_bytes, estimate
from longtrain.memory.step_time import H200, MEASURED, Rates
from longtrain.models.costs import count_params


def _gib(x: float) -> str:
    return f"{x / GiB:8.2f}"


def _family(pol: Policy) -> tuple:
    return dataclasses.astuple(dataclasses.replace(pol, offload_fraction=1.0 if pol.offload_fraction else 0.0))


def shown_rows(p: Plan) -> list:
    """The rows ``longtrain plan`` prints, fastest first: of each family of policies (the same but
    for the offload fraction), the fastest that fits, else its leanest; and the chosen one."""
    best: dict = {}
    for e in p.rows:
        k = _family(e.policy)
        cur = best.get(k)
        if cur is None:
            best[k] = e
            continue
        key = lambda x: (not fits(x, p), x.time.total if fits(x, p) else -x.policy.offload_fraction)
        if key(e) < key(cur):
            best[k] = e
    rows = list(best.values())
    if p.chosen is not None and p.chosen not in rows:
        rows.append(p.chosen)
    return sorted(rows, key=lambda e: (not fits(e, p), e.time.total))


def format_plan(cfg: Config, p: Plan, limit: int = 24) -> str:
    m, lay = cfg.model, p.layout
    T = cfg.data.batch_size * cfg.data.seq_len // lay.sp
    head = (f"model {m.arch} dim={m.dim} layers={m.n_unrolled_layers} ffn={m.ffn_dim} vocab={m.vocab_size} "
            f"params={count_params(m)['total'] / 1e9:.3f}B | seq={cfg.data.seq_len} batch={cfg.data.batch_size} "
            f"-> {T} tokens/rank | dp_replicate={lay.dp_replicate} dp_shard={lay.dp_shard} tp={lay.tp} "
            f"sp={lay.sp} pp={lay.pp} | activations {act_bytes(cfg)} B/elem\n"
            f"GPU budget {p.budget_desc}: {usable(p.budget) / GiB:.1f} GiB usable "
            f"(less {RESERVE_FRACTION:.0%} + {RESERVE_BYTES / GiB:g} GiB reserve); host budget "
            f"{p.host_budget / GiB:g} GiB per rank")
    rows = shown_rows(p)[:limit]
    keys = []
    for e in rows:
        for k in e.gpu:
            if k not in keys:
                keys.append(k)
    short = {"parameters": "params", "gradients": "grads", "optimizer": "optim", "activations": "acts",
             "head input": "head-in", "offload buffers": "offbuf", "layer working set": "layerws",
             "logits/loss": "loss", "tp all-gather": "tp-ag", "fsdp unsharded root": "fsdp-rt",
             "fsdp block gathers": "fsdp-blk", "weight copies": "wcopies"}
    cols = ["policy".ljust(44)] + [short.get(k, k)[:8].rjust(8) for k in keys] + \
           ["GPU GiB".rjust(8), "host GiB".rjust(8), "step s".rjust(9), "ideal s".rjust(9), "peak at".ljust(22), " fits"]
    lines = [head, "", " ".join(cols)]
    for e in rows:
        mark = " <- chosen" if e is p.chosen else ("  yes" if fits(e, p) else "  no")
        vals = [_gib(e.gpu.get(k, 0)) for k in keys]
        lines.append(" ".join([e.policy.name.ljust(44)] + vals +
                              [_gib(e.gpu_total), _gib(e.host_total), f"{e.time.total:9.2f}",
                               f"{e.time.ideal:9.2f}", e.phase.ljust(22), mark]))
    if p.chosen is not None:
        terms = ", ".join(f"{k} {v:.2f}" for k, v in p.chosen.time.terms.items())
        lines.append(f"\nchosen step, by term (s): {terms}; kernel-bound ideal (no recomputation, "
                     f"communication or offload) {p.chosen.time.ideal:.2f} s")
    lines.append(f"\nmemory terms at the moment of each row's peak (longtrain.memory.step_memory's docstring); "
                 f"step s from longtrain.memory.step_time (H200 rates; its error against measured steps: "
                 f"longtrain plan --check-time). Of each policy family the fastest fitting offload fraction "
                 f"(steps of 1/{OFFLOAD_STEPS}) is shown, else the leanest.")
    if p.chosen is None:
        lines.append("nothing fits; see the error for what to change.")
    return "\n".join(lines)


def time_model_error(rates: Rates = H200) -> list[tuple]:
    """(measured row, predicted seconds, relative error) for every step in ``step_time.MEASURED``:
    the config at that length and layout, the row's policy with this planner's tiling sizes, and
    the planner's own estimate of what it offloads."""
    out = []
    for row in MEASURED:
        cfg = load_config(row.config, [f"data.seq_len={row.seq_len}", f"parallel.sp={row.sp}",
                                       "schedule.dtype=bf16", "data.batch_size=1", "schedule.grad_accum=1",
                                       f"model.max_seq_len={max(row.seq_len, 131072)}", *row.overrides])
        lay = layout_from(cfg, row.sp)
        mlp, loss = tiling_sizes(cfg, lay)
        fields = dict(row.policy)
        for key, size in (("tiled_loss", loss), ("tiled_mlp", mlp)):
            if fields.get(key):
                fields[key] = size
        e = estimate(cfg, lay, Policy(**fields), rates)
        out.append((row, e.time.total, (e.time.total - row.seconds) / row.seconds))
    return out


def format_time_model_error(rows: list) -> str:
    lines = [f"{'measured step (docs/performance.md)':66s} {'measured s':>10s} {'model s':>9s} {'error':>7s}"]
    for row, p, err in rows:
        lines.append(f"{row.describe():66s} {row.seconds:10.2f} {p:9.2f} {err:+7.1%}"
                     + ("" if row.fitted else "  (after the fit)"))
    for label, sel in (("fitted", True), ("measured after the fit", False)):
        errs = [abs(e) for r, _, e in rows if r.fitted == sel]
        if errs:
            lines.append(f"{label}: mean |error| {sum(errs) / len(errs):.1%}, largest {max(errs):.1%} "
                         f"over {len(errs)} steps")
    return "\n".join(lines)
