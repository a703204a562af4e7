"""Instability monitors: what diverges first, measured cheaply every ``logging.stability_every`` steps.

Owns: ``StabilityMonitor`` (hooks armed for one step in N, reduced over every rank, logged with
the step's metrics, and a warning line when a value crosses its ``logging.stability.*`` threshold)
and ``attention_stats`` (largest logit and mean entropy of a block of attention rows).

What is measured, per block the model lists (``model.blocks()``), on the monitored step's own
forward and backward:

- attention: the largest scaled logit q.k/sqrt(d) and the mean entropy (nats) of the softmax
  rows of the last ``stability.queries`` queries of every sequence, against all the keys they may
  see (causal, and within their document). The block is scored in float32, as many heads at once
  as fit in ``ATTENTION_BLOCK_ELEMENTS`` scores, so full attention is never materialised;
- the RMS of the block's output (the residual stream) and of its parameters' gradients (before
  clipping), and the ratio |update| / |parameters| of the optimizer step;
- the output logits of the last ``stability.tokens`` tokens of every sequence (of every rank's
  sequence shard under tensor or sequence parallelism): their mean and max and the mean
  log-partition log Z, with its drift since the first measurement of this process;
- for a looped model, the RMS of the state after each core iteration (``on_loop_output``).

Blocks a looped core runs R times report the max / mean over their R calls. Cost: hooks exist
only on monitored steps (registered in ``begin``, removed in ``after_backward``), skip the re-runs
of forward that recomputation does inside backward, and leave their statistics on the device;
``end`` reduces them over all ranks in one sum and one max all-reduce and copies them to the host
once. Statistics are sums, counts and maxima: every layout holds each token (tensor and sequence
shards) or head (tensor parallel, Ulysses) exactly once, except the gathered logits under tensor
parallelism, which are the same on the tp ranks and so leave means and maxima unchanged. Sums of
squares over parameters and gradients are taken over each rank's local shard, divided by the
number of ranks holding that same shard (``_copies``), so the sum over all ranks counts every
element once -- without a collective per block.

Pipeline parallel: the trainer's model is a ``PipelineModel``, which lists the blocks, head and
loop of this rank's stages; the stage models keep the whole model's names, so metrics name
layers by their global index as in one process. Each rank holds different blocks, so the first
monitored step exchanges the metric names once (``all_gather_object``) to reduce one vector of
the same layout everywhere; a weight several stages hold (looped core, tied embedding) counts
once, at its first stage (the copies marked ``_pp_replica``). The modules come from the model's
own description (``blocks()``, ``loss_head()``, ``on_loop_output``); attention is found as the
``CoreAttention`` every block calls, the module Ulysses wraps.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from longtrain.memory.recompute import in_backward
from longtrain.models.attention import CoreAttention
from longtrain.parallel.pipeline import in_shape_inference
from longtrain.parallel.reduce import counted_once

ATTENTION_BLOCK_ELEMENTS = 1 << 24  # float32 scores scored at once per block (64 MiB; ~4x that in temporaries)


@torch.no_grad()
def attention_stats(q: torch.Tensor, k: torch.Tensor, doc_ids: torch.Tensor | None, n_queries: int):
    """(largest logit, sum of row entropies, number of rows) over the last ``n_queries`` query
    rows of ``q`` [B, S, Hq, D] against ``k`` [B, S, Hk, D] (causal; within a document). The
    logit and the sum stay on the device (0-d tensors)."""
    B, S, Hq, D = q.shape
    n, Hk = min(n_queries, S), k.shape[2]
    rep = Hq // Hk
    pos_q = torch.arange(S - n, S, device=q.device)
    mask = (torch.arange(S, device=q.device)[None, :] <= pos_q[:, None])[None]  # [1, n, S]
    if doc_ids is not None:
        mask = mask & (doc_ids[:, S - n:, None] == doc_ids[:, None, :])
    mask = mask[:, None, None]  # [B|1, 1, 1, n, S]
    qs = (q[:, S - n:].float() * D ** -0.5).view(B, n, Hk, rep, D)
    # key heads per chunk: [B, chunk, rep, n, S] scores at most ATTENTION_BLOCK_ELEMENTS
    chunk = max(1, min(Hk, ATTENTION_BLOCK_ELEMENTS // max(1, B * rep * n * S)))
    top = torch.full((), -math.inf, device=q.device)  # a fill, not a copy from the host
    ent = torch.zeros((), dtype=torch.float64, device=q.device)
    for h in range(0, Hk, chunk):
        s = torch.einsum("bnhrd,bshd->bhrns", qs[:, :, h:h + chunk], k[:, :, h:h + chunk].float())
        s = s.masked_fill(~mask, -math.inf)
        top = torch.maximum(top, s.amax())
        log_z = torch.logsumexp(s, dim=-1, keepdim=True)
        p = torch.exp(s - log_z)
        # H = log Z - sum p s (masked scores contribute p = 0)
        ent += (log_z.squeeze(-1) - (p * s.masked_fill(~mask, 0.0)).sum(-1)).double().sum()
    return top, ent, B * n * Hq


def _skipped() -> bool:
    """Forwards that are not the step's own: recomputation inside backward, and the pipeline
    schedule's shape inference."""
    return in_backward() or in_shape_inference()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _copies(t: torch.Tensor, dims) -> int:
    """Ranks of this pipeline stage holding the same values as this rank's (local part of) ``t``:
    all of them for a plain tensor, those it is not sharded over for a DTensor."""
    per_stage = max(1, dims.world_size // dims.pp)
    if not isinstance(t, DTensor):
        return per_stage
    shards = 1
    for i, placement in enumerate(t.placements):
        if placement.is_shard():
            shards *= t.device_mesh.size(i)
    return max(1, per_stage // shards)


def _sum_squares(tensors, dims) -> tuple[torch.Tensor, float]:
    """(sum of squares, element count) of ``tensors``' local parts, each divided by its number
    of copies: summed over all ranks, every element counts once."""
    total, count = torch.zeros((), dtype=torch.float64, device=dims.device), 0.0
    for t in tensors:
        c = _copies(t, dims)
        x = _local(t).detach()
        total += torch.linalg.vector_norm(x, dtype=torch.float32).double().square() / c
        count += x.numel() / c
    return total, count


class StabilityMonitor:
    """``begin(step)`` before forward, ``after_backward()`` before clipping, ``end()`` after the
    optimizer step: the metrics (``stability/...``) of a monitored step, else None."""

    def __init__(self, model, logging_cfg, dims):
        self.every = logging_cfg.stability_every
        self.cfg = logging_cfg.stability
        self.model, self.dims = model, dims
        self.blocks = model.blocks() if self.every else []
        self.due = False
        self.handles: list = []
        self.logz0: float | None = None
        self.names: tuple | None = None  # with pp > 1: every rank's metric names, exchanged once

    # ---------------------------------------------------------------- hooks

    def begin(self, step: int) -> None:
        """Arm the hooks when the step about to run (0-based ``step``) is a monitored one."""
        self.due = bool(self.every) and (step + 1) % self.every == 0
        if not self.due:
            return
        self.sums: dict = {}  # name -> 0-d float64 tensor on the device, summed over ranks
        self.counts: dict = defaultdict(float)  # name -> host number, summed over ranks
        self.maxes: dict = {}  # name -> 0-d tensor on the device, max over ranks
        for ref in self.blocks:
            self.handles.append(ref.module.register_forward_hook(self._block_hook(ref.name)))
            for core in (m for m in ref.module.modules() if isinstance(m, CoreAttention)):
                self.handles.append(core.register_forward_pre_hook(self._attention_hook(ref.name)))
        head = self.model.loss_head()
        if head is not None:
            self.handles.append(head.register_forward_pre_hook(self._head_hook(head)))
        self.handles += self.model.on_loop_output(self._loop_hook)

    def _add(self, key: str, total: torch.Tensor, count: float) -> None:
        total = total.double()
        self.sums[key] = self.sums[key] + total if key in self.sums else total
        self.counts[key] += float(count)

    def _max(self, key: str, value: torch.Tensor) -> None:
        value = value.double()
        self.maxes[key] = torch.maximum(self.maxes[key], value) if key in self.maxes else value

    def _block_hook(self, name: str):
        def hook(module, args, out):
            if _skipped():
                return
            x = _local(out).detach()
            self._add(f"act_rms/{name}", torch.linalg.vector_norm(x, dtype=torch.float32).square(), x.numel())
        return hook

    def _attention_hook(self, name: str):
        def hook(module, args):
            if _skipped():
                return
            q, k = (_local(t).detach() for t in args[:2])
            doc_ids = args[3] if len(args) > 3 else None
            top, ent, rows = attention_stats(q, k, doc_ids, self.cfg.queries)
            self._max(f"attn_max_logit/{name}", top)
            self._add(f"attn_entropy/{name}", ent, rows)
        return hook

    def _head_hook(self, head):
        def hook(module, args):
            if _skipped():
                return
            h = _local(args[0]).detach()
            with torch.no_grad():
                logits = _local(head.logits(h[:, -min(self.cfg.tokens, h.shape[1]):])).float()
            self._max("out_logit_max", logits.amax())
            self._add("out_logit_mean", logits.sum(), logits.numel())
            self._add("logz_mean", torch.logsumexp(logits, dim=-1).sum(), logits[..., 0].numel())
        return hook

    def _loop_hook(self, i: int, out) -> None:
        if _skipped():
            return
        x = _local(out).detach()
        self._add(f"loop_rms/{i}", torch.linalg.vector_norm(x, dtype=torch.float32).square(), x.numel())

    # ---------------------------------------------------------------- after backward / step

    def after_backward(self) -> None:
        """Disarm the hooks; measure gradient RMS per block (before clipping) and keep the
        parameters to measure the update against. No collective and no host copy here."""
        if not self.due:
            return
        for h in self.handles:
            h.remove()
        self.handles = []
        for ref in self.blocks:
            grads = [p.grad for p in counted_once(ref.module.parameters()) if p.grad is not None]
            if grads:
                self._add(f"grad_rms/{ref.name}", *_sum_squares(grads, self.dims))
        self.params = counted_once(self.model.parameters())
        self.before = [p.detach().clone() for p in self.params]

    def _watch(self):
        """The hang watchdog's mark (``dims.watch``) around the monitors' reductions."""
        watch = getattr(self.dims, "watch", None)
        return watch("stability monitors") if watch is not None else contextlib.nullcontext()

    def end(self, step: int) -> dict | None:
        """The monitored step's metrics (after the optimizer step), with warnings printed; else None."""
        if not self.due:
            return None
        self.due = False
        # one parameter's difference at a time, not a second copy of the model
        self._add("update", *_sum_squares((p.detach() - b for p, b in zip(self.params, self.before)), self.dims))
        self._add("param", *_sum_squares(self.before, self.dims))
        self.params, self.before = [], []
        with self._watch():
            reduced = self._reduced()
        update, param = reduced.pop("update"), reduced.pop("param")
        out = {f"stability/{k}": v for k, v in reduced.items()}
        out["stability/update_ratio"] = math.sqrt(update / max(param, 1e-60))
        if "stability/logz_mean" in out:
            if self.logz0 is None:
                self.logz0 = out["stability/logz_mean"]
            out["stability/logz_drift"] = out["stability/logz_mean"] - self.logz0
        warnings = self.warnings(out)
        if warnings and self.dims.is_main:
            for w in warnings:
                print(f"[longtrain] warning: step {step}: {w}", flush=True)
        out["stability/warnings"] = len(warnings)
        return out

    def _metric_names(self) -> tuple[list, list]:
        """The summed and the maximised names, the same list on every rank. Without pipeline
        stages every rank measures the same names; with them each holds its stages' blocks, so
        the union is exchanged on the first monitored step (the names stay the same from then
        on: the pipeline fixes the loop count)."""
        skeys, mkeys = sorted(self.sums), sorted(self.maxes)
        if self.dims.pp <= 1 or self.dims.world_size <= 1:
            return skeys, mkeys
        if self.names is None:
            every: list = [None] * self.dims.world_size
            dist.all_gather_object(every, (skeys, mkeys))
            self.names = (sorted({k for s, _ in every for k in s}), sorted({k for _, m in every for k in m}))
        if not (set(skeys) <= set(self.names[0]) and set(mkeys) <= set(self.names[1])):
            raise RuntimeError(f"stability monitors: rank {self.dims.rank} measured names its pipeline stages did "
                               f"not report at the first monitored step ({sorted(set(skeys) - set(self.names[0]))})")
        return self.names

    def _reduced(self) -> dict:
        """Sums, counts and maxima of every rank combined (one sum and one max all-reduce, one
        copy to the host); means from sums and counts, RMS as their square root."""
        skeys, mkeys = self._metric_names()
        dev = self.dims.device
        zero = torch.zeros((), dtype=torch.float64, device=dev)
        low = torch.full((), -math.inf, dtype=torch.float64, device=dev)
        # the counts are host numbers: copied from pinned memory, so the copy does not wait for the GPU
        counts = torch.tensor([self.counts.get(k, 0.0) for k in skeys], dtype=torch.float64,
                              pin_memory=dev.type == "cuda").to(dev, non_blocking=True)
        s = torch.cat([torch.stack([self.sums.get(k, zero) for k in skeys]) if skeys else zero[None][:0], counts])
        m = torch.stack([self.maxes.get(k, low) for k in mkeys]) if mkeys else low[None][:0]
        if self.dims.world_size > 1:
            dist.all_reduce(s, op=dist.ReduceOp.SUM)
            if m.numel():
                dist.all_reduce(m, op=dist.ReduceOp.MAX)
        values = torch.cat([s, m]).tolist()  # the one device -> host copy of a monitored step
        n = len(skeys)
        out = dict(zip(mkeys, values[2 * n:]))
        for key, total, count in zip(skeys, values[:n], values[n:2 * n]):
            if key in ("update", "param"):
                out[key] = total
            elif key.startswith(("act_rms/", "loop_rms/", "grad_rms/")):
                out[key] = math.sqrt(total / max(count, 1.0))
            else:
                out[key] = total / max(count, 1.0)
        return out

    def warnings(self, out: dict) -> list[str]:
        """One line per monitor past its ``logging.stability.*`` threshold."""
        c, lines = self.cfg, []
        for key, v in out.items():
            if key.startswith("stability/attn_entropy/") and v < c.entropy_min:
                lines.append(f"attention entropy collapse in {key.rsplit('/', 1)[1]}: mean entropy {v:.4g} nats "
                             f"< logging.stability.entropy_min={c.entropy_min}")
            if key.startswith("stability/attn_max_logit/") and v > c.attn_logit_max:
                lines.append(f"attention logit growth in {key.rsplit('/', 1)[1]}: max logit {v:.4g} "
                             f"> logging.stability.attn_logit_max={c.attn_logit_max}")
        if out.get("stability/out_logit_max", -math.inf) > c.output_logit_max:
            lines.append(f"output logit growth: max logit {out['stability/out_logit_max']:.4g} "
                         f"> logging.stability.output_logit_max={c.output_logit_max}")
        if abs(out.get("stability/logz_drift", 0.0)) > c.logz_drift_max:
            lines.append(f"log Z drift {out['stability/logz_drift']:+.4g} since the first measurement exceeds "
                         f"logging.stability.logz_drift_max={c.logz_drift_max}")
        return lines
