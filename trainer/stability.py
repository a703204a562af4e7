"""Instability monitors: what diverges first, measured cheaply every ``logging.stability_every`` steps.

Owns: ``StabilityMonitor`` (hooks armed for one step in N, reduced over every rank, logged with
the step's metrics, and a warning line when a value crosses its ``logging.stability.*`` threshold)
and ``attention_stats`` (largest logit and mean entropy of a block of attention rows).

What is measured, per block the model lists (``model.blocks()``), on the monitored step's own
forward and backward:

- attention: the largest scaled logit q.k/sqrt(d) and the mean entropy (nats) of the softmax
  rows of the last ``stability.queries`` queries of every sequence, against all the keys they may
  see (causal, and within their document). The block is scored head by head in float32, so at
  most [batch, queries, seq] scores exist at once and full attention is never materialised;
- the RMS of the block's output (the residual stream) and of its parameters' gradients (before
  clipping), and the ratio |update| / |parameters| of the optimizer step;
- the output logits of the last ``stability.tokens`` tokens of every sequence (of every rank's
  sequence shard under tensor or sequence parallelism): their mean and max and the mean
  log-partition log Z, with its drift since the first measurement of this process;
- for a looped model, the RMS of the state after each core iteration (``on_loop_output``).

Blocks a looped core runs R times report the max / mean over their R calls. Hooks are only
registered on monitored steps (no cost otherwise) and skip the re-runs of forward that
recomputation does inside backward. Statistics are sums, counts and maxima, reduced over all
ranks: every layout holds each token (tensor and sequence shards) or head (tensor parallel,
Ulysses) exactly once, except the gathered logits under tensor parallelism, which are the same on
the tp ranks and so leave means and maxima unchanged. The modules come from the model's own
description (``blocks()``, ``loss_head()``, ``on_loop_output``); attention is found as the
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
from longtrain.parallel.reduce import grad_norm, total_norm


@torch.no_grad()
def attention_stats(q: torch.Tensor, k: torch.Tensor, doc_ids: torch.Tensor | None, n_queries: int):
    """(largest logit, sum of row entropies, number of rows) over the last ``n_queries`` query
    rows of ``q`` [B, S, Hq, D] against ``k`` [B, S, Hk, D] (causal; within a document)."""
    B, S, Hq, D = q.shape
    n = min(n_queries, S)
    rep = Hq // k.shape[2]
    pos_q = torch.arange(S - n, S, device=q.device)
    mask = (torch.arange(S, device=q.device)[None, :] <= pos_q[:, None])[None]  # [1, n, S]
    if doc_ids is not None:
        mask = mask & (doc_ids[:, S - n:, None] == doc_ids[:, None, :])
    qs = q[:, S - n:].float() * D ** -0.5
    top = torch.tensor(-math.inf, device=q.device)
    ent = torch.zeros((), dtype=torch.float64, device=q.device)
    for h in range(Hq):
        s = torch.einsum("bnd,bsd->bns", qs[:, :, h], k[:, :, h // rep].float()).masked_fill(~mask, -math.inf)
        top = torch.maximum(top, s.max())
        log_z = torch.logsumexp(s, dim=-1, keepdim=True)
        p = torch.exp(s - log_z)
        # H = log Z - sum p s (masked scores contribute p = 0)
        ent += (log_z.squeeze(-1) - (p * s.masked_fill(~mask, 0.0)).sum(-1)).double().sum()
    return top, ent, B * n * Hq


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


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

    # ---------------------------------------------------------------- hooks

    def begin(self, step: int) -> None:
        """Arm the hooks when the step about to run (0-based ``step``) is a monitored one."""
        self.due = bool(self.every) and (step + 1) % self.every == 0
        if not self.due:
            return
        self.sums: dict = defaultdict(float)  # summed over ranks
        self.maxes: dict = defaultdict(lambda: -math.inf)  # max over ranks
        for ref in self.blocks:
            self.handles.append(ref.module.register_forward_hook(self._block_hook(ref.name)))
            for core in (m for m in ref.module.modules() if isinstance(m, CoreAttention)):
                self.handles.append(core.register_forward_pre_hook(self._attention_hook(ref.name)))
        head = self.model.loss_head()
        if head is not None:
            self.handles.append(head.register_forward_pre_hook(self._head_hook(head)))
        self.handles += self.model.on_loop_output(self._loop_hook)

    def _add(self, key: str, total, count) -> None:
        self.sums[key + "#s"] += float(total)
        self.sums[key + "#n"] += float(count)

    def _block_hook(self, name: str):
        def hook(module, args, out):
            if in_backward():
                return
            x = _local(out).detach().float()
            self._add(f"act_rms/{name}", x.square().sum(), x.numel())
        return hook

    def _attention_hook(self, name: str):
        def hook(module, args):
            if in_backward():
                return
            q, k = (_local(t).detach() for t in args[:2])
            doc_ids = args[3] if len(args) > 3 else None
            top, ent, rows = attention_stats(q, k, doc_ids, self.cfg.queries)
            key = f"attn_max_logit/{name}"
            self.maxes[key] = max(self.maxes[key], float(top))
            self._add(f"attn_entropy/{name}", ent, rows)
        return hook

    def _head_hook(self, head):
        def hook(module, args):
            if in_backward():
                return
            h = _local(args[0]).detach()
            with torch.no_grad():
                logits = _local(head.logits(h[:, -min(self.cfg.tokens, h.shape[1]):])).float()
            self.maxes["out_logit_max"] = max(self.maxes["out_logit_max"], float(logits.max()))
            self._add("out_logit_mean", logits.sum(), logits.numel())
            self._add("logz_mean", torch.logsumexp(logits, dim=-1).sum(), logits[..., 0].numel())
        return hook

    def _loop_hook(self, i: int, out) -> None:
        if in_backward():
            return
        x = _local(out).detach().float()
        self._add(f"loop_rms/{i}", x.square().sum(), x.numel())

    # ---------------------------------------------------------------- after backward / step

    def after_backward(self) -> None:
        """Disarm the hooks; measure gradient RMS per block (before clipping) and keep the
        parameters to measure the update against."""
        if not self.due:
            return
        with self._watch():
            self._after_backward()

    def _watch(self):
        """The hang watchdog's mark (``dims.watch``) around the monitors' reductions."""
        watch = getattr(self.dims, "watch", None)
        return watch("stability monitors") if watch is not None else contextlib.nullcontext()

    def _after_backward(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.grad_rms = {}
        for ref in self.blocks:
            params = [p for p in ref.module.parameters() if p.grad is not None]
            n = sum(p.numel() for p in params)
            if n:
                self.grad_rms[f"grad_rms/{ref.name}"] = float(grad_norm(params, self.dims)) / math.sqrt(n)
        self.before = [p.detach().clone() for p in self.model.parameters()]

    def end(self, step: int) -> dict | None:
        """The monitored step's metrics (after the optimizer step), with warnings printed; else None."""
        if not self.due:
            return None
        self.due = False
        with self._watch():
            params = [p.detach() for p in self.model.parameters()]
            update = total_norm([p - b for p, b in zip(params, self.before)], self.dims)
            ratio = float(update) / max(float(total_norm(self.before, self.dims)), 1e-30)
            self.before = []
            reduced = self._reduced()
        out = {f"stability/{k}": v for k, v in reduced.items()}
        out.update({f"stability/{k}": v for k, v in self.grad_rms.items()})
        out["stability/update_ratio"] = ratio
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

    def _reduced(self) -> dict:
        """Sums, counts and maxima of every rank combined; means from sums and counts."""
        skeys, mkeys = sorted(self.sums), sorted(self.maxes)
        dev = self.dims.device
        s = torch.tensor([self.sums[k] for k in skeys], dtype=torch.float64, device=dev)
        m = torch.tensor([self.maxes[k] for k in mkeys], dtype=torch.float64, device=dev)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(s, op=dist.ReduceOp.SUM)
            if m.numel():
                dist.all_reduce(m, op=dist.ReduceOp.MAX)
        sums = dict(zip(skeys, s.tolist()))
        out = {k: v for k, v in zip(mkeys, m.tolist())}
        for key in (k[:-2] for k in skeys if k.endswith("#s")):
            total, count = sums[key + "#s"], max(sums[key + "#n"], 1.0)
            if key.startswith(("act_rms/", "loop_rms/")):
                out[key] = math.sqrt(total / count)
            else:
                out[key] = total / count
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
