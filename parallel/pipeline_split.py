"""Cutting a model into pipeline stages: virtual layers, balanced boundaries, pruned stage models.

Owns: the *virtual-layer* view of a model (``virtual_layers``), its cost model, the stage
boundaries (``stage_boundaries``: balanced automatically or given by ``parallel.pp_boundaries``),
which rank runs which stage (``stage_ranks``), and ``build_stage_model`` -- a copy of the model
that keeps only what one stage owns and whose ``forward`` runs only that stage.

The idea (torchtitan's): a stage is the model itself with the parts it does not own removed, so
parameter names (``layers.5.attention.wq.weight``) are the same as in the whole model and
``parallelize`` / checkpoints treat a stage like a smaller model.

Virtual layers. A Llama is its blocks ``layers.0 .. layers.L-1``. A looped transformer is
*unrolled*: ``prelude.0 ..``, then one virtual layer per core iteration ``core@0 .. core@R-1``
(each runs all ``n_core`` shared blocks with that iteration's LoRA), then ``coda.0 ..``. A stage is
a contiguous run of virtual layers, so it may hold several iterations of the shared core; every
stage running at least one iteration holds a copy of the core (and its LoRA tables, and the
``concat`` re-injection projection when it runs an iteration >= 1). ``parallel.pipeline`` sums
those copies' gradients so training equals one process. The embedding belongs to the first
stage and the head to the last. The loop count must therefore be fixed (``model.loops``).

What travels between stages: the hidden state, plus -- for a looped model, while a later stage
still re-injects -- the prelude output ``e``. Position ids and document ids are *not* passed
along: every stage receives the micro-batch's side inputs as keyword arguments from the
schedule (all ranks of one pipeline read the same batch), which keeps the p2p traffic to the
activations and needs no integer tensors in the backward pass.

Cost model (per token, forward; backward is proportional): a block is its matmul FLOPs plus
causal attention (``2 * seq * dim``); the head is ``2 * dim * vocab`` plus the cross-entropy
(counted as one more pass over the logits); the embedding lookup does no matmul and is counted
as zero compute. Boundaries minimise the most expensive stage, and among those splits the sum
of squared stage costs (so spare slack is spread, not piled on one stage).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from longtrain.config import ConfigError

# --------------------------------------------------------------------------------------------
# Virtual layers and their cost
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VirtualLayer:
    """One unit of pipeline work. ``kind``: layer | prelude | core | coda; ``index``: the block
    index, or the loop iteration for ``core``."""

    kind: str
    index: int
    cost: float

    @property
    def name(self) -> str:
        if self.kind == "core":
            return f"core@{self.index}"
        return f"{'layers' if self.kind == 'layer' else self.kind}.{self.index}"


def block_cost(m, seq_len: int) -> float:
    """Forward FLOPs per token of one transformer block (matmuls + causal attention)."""
    hd = m.head_dim
    attn_proj = m.dim * hd * (m.n_heads + 2 * m.n_kv_heads) + m.n_heads * hd * m.dim
    return 2.0 * (attn_proj + 3 * m.dim * m.ffn_dim) + 2.0 * seq_len * m.n_heads * hd


def head_cost(m) -> float:
    """Forward FLOPs per token of the output projection, plus about as much for the softmax/CE."""
    return 2.0 * m.dim * m.vocab_size + 2.0 * m.vocab_size


def embed_cost(m) -> float:
    """An embedding lookup does no matmul: counted as zero compute (it is memory, not FLOPs)."""
    return 0.0


def virtual_layers(m, seq_len: int) -> list[VirtualLayer]:
    """The model as a flat list of units, in execution order (a looped core unrolled)."""
    b = block_cost(m, seq_len)
    if m.arch == "llama":
        return [VirtualLayer("layer", i, b) for i in range(m.n_layers)]
    core = m.n_core * b
    if m.lora_rank:  # per projection x A^T B^T: 2 * rank * (in + out) per token
        kv = m.n_kv_heads * m.head_dim
        in_out = 4 * m.dim + 2 * (m.dim + kv) + 3 * (m.dim + m.ffn_dim)  # wq, wo; wk, wv; w1, w2, w3
        core += m.n_core * 2.0 * m.lora_rank * in_out
    return ([VirtualLayer("prelude", i, b) for i in range(m.n_prelude)]
            + [VirtualLayer("core", i, core) for i in range(m.loops)]
            + [VirtualLayer("coda", i, b) for i in range(m.n_coda)])


# --------------------------------------------------------------------------------------------
# Boundaries
# --------------------------------------------------------------------------------------------


def balance(costs: list[float], n_stages: int, first_extra: float = 0.0, last_extra: float = 0.0) -> list[int]:
    """Split ``costs`` into ``n_stages`` non-empty contiguous runs; return where runs 1.. start.

    ``first_extra`` / ``last_extra`` are added to the first / last run (embedding, head). Exact:
    a dynamic programme finds the smallest possible maximum run cost, a second one the split with
    the smallest sum of squares among those within it.
    """
    n = len(costs)
    if not 1 <= n_stages <= n:
        raise ValueError(f"cannot split {n} virtual layers into {n_stages} non-empty stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def run(i: int, j: int) -> float:  # cost of units [i, j)
        return prefix[j] - prefix[i] + (first_extra if i == 0 else 0.0) + (last_extra if j == n else 0.0)

    inf = float("inf")
    # best[k][j]: minimal max-run over splits of units [0, j) into k runs
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, n_stages + 1):
        for j in range(k, n + 1):
            best[k][j] = min((max(best[k - 1][i], run(i, j)) for i in range(k - 1, j)), default=inf)
    bound = best[n_stages][n] * (1 + 1e-9) + 1e-12
    # among splits with every run <= bound: minimal sum of squares (exact, same recurrence)
    sq = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    arg = [[-1] * (n + 1) for _ in range(n_stages + 1)]
    sq[0][0] = 0.0
    for k in range(1, n_stages + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                c = run(i, j)
                if c <= bound and sq[k - 1][i] + c * c < sq[k][j]:
                    sq[k][j], arg[k][j] = sq[k - 1][i] + c * c, i
    starts, j = [], n
    for k in range(n_stages, 0, -1):
        j = arg[k][j]
        starts.append(j)
    return sorted(starts)[1:]  # drop the first run's start (0)


def n_pipeline_stages(p) -> int:
    """Stages in the whole pipeline: one per rank, or ``pp_virtual_stages`` per rank."""
    return p.pp * (p.pp_virtual_stages if p.pp_schedule in MULTI_STAGE_SCHEDULES else 1)


MULTI_STAGE_SCHEDULES = ("interleaved_1f1b", "zero_bubble")


def check_pipeline_config(cfg) -> None:
    """What the pipeline cannot do, as errors that say what to change."""
    m, p = cfg.model, cfg.parallel
    if p.pp <= 1:
        return
    if m.arch == "looped":
        if m.loop_sampling != "fixed":
            raise ConfigError(
                f"model.loop_sampling={m.loop_sampling} with parallel.pp={p.pp}: pipeline stages are cut "
                f"from the unrolled loop (each stage holds fixed core iterations), so the loop count must "
                f"be the same every step. Set model.loop_sampling=fixed (model.loops={m.loops} iterations) "
                f"or parallel.pp=1.")
        if m.backprop_loops and m.backprop_loops < m.loops:
            raise ConfigError(
                f"model.backprop_loops={m.backprop_loops} < model.loops={m.loops} with parallel.pp={p.pp} "
                f"is not supported: a stage boundary inside the no-grad iterations would send an activation "
                f"without gradient. Set model.backprop_loops=0 (or >= loops), or parallel.pp=1.")
    if p.pp_schedule == "zero_bubble" and cfg.schedule.compile:
        raise ConfigError("parallel.pp_schedule=zero_bubble splits each backward into input and weight "
                          "parts, which torch.compile does not support; set schedule.compile=false or use "
                          "another parallel.pp_schedule.")


def stage_boundaries(cfg, n_stages: int) -> list[int]:
    """Start index (into ``virtual_layers``) of every stage after the first."""
    m = cfg.model
    units = virtual_layers(m, cfg.data.seq_len)
    names = ", ".join(f"{i}:{u.name}" for i, u in enumerate(units))
    if len(units) < n_stages:
        raise ConfigError(
            f"the model has {len(units)} virtual layers ({names}) but the pipeline needs {n_stages} "
            f"non-empty stages (parallel.pp={cfg.parallel.pp}"
            + (f" x parallel.pp_virtual_stages={cfg.parallel.pp_virtual_stages}" if n_stages > cfg.parallel.pp else "")
            + "); use fewer stages or a deeper model.")
    given = cfg.parallel.pp_boundaries
    if given is None or len(given) == 0:
        return balance([u.cost for u in units], n_stages, embed_cost(m), head_cost(m))
    b = [int(x) for x in given]
    if len(b) != n_stages - 1 or any(not 0 < x < len(units) for x in b) or b != sorted(set(b)):
        raise ConfigError(
            f"parallel.pp_boundaries={list(given)} must be {n_stages - 1} strictly increasing virtual-layer "
            f"indices in [1, {len(units) - 1}] (where stages 1..{n_stages - 1} start); the virtual layers are "
            f"{names}. Leave it empty (null) for automatic balancing.")
    return b


def stage_ranks(pp: int, n_stages: int) -> list[int]:
    """Pipeline rank of each stage: round-robin ("loop" style: stage s on rank s % pp)."""
    return [s % pp for s in range(n_stages)]


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageSpec:
    """What one stage runs and what crosses its borders."""

    index: int
    n_stages: int
    units: tuple  # VirtualLayer, in order
    takes_e: bool  # receives the prelude output as a second input (looped)
    emits_e: bool  # sends it on as a second output

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.n_stages - 1

    def describe(self) -> str:
        names = [u.name for u in self.units]
        extra = (["tok_embeddings"] if self.is_first else []) + names + (["head"] if self.is_last else [])
        return f"stage {self.index}: " + " ".join(extra)


def plan_stages(cfg, n_stages: int, boundaries: Optional[list[int]] = None) -> list[StageSpec]:
    m = cfg.model
    units = virtual_layers(m, cfg.data.seq_len)
    b = stage_boundaries(cfg, n_stages) if boundaries is None else list(boundaries)
    starts = [0] + b
    ends = b + [len(units)]
    groups = [tuple(units[s:e]) for s, e in zip(starts, ends)]
    reinjects = m.arch == "looped" and m.reinject != "none"
    # e is needed after stage s iff a later stage runs a core iteration >= 1
    needs_e_after = []
    for s in range(n_stages):
        later = [u for g in groups[s + 1:] for u in g]
        needs_e_after.append(reinjects and any(u.kind == "core" and u.index >= 1 for u in later))
    return [StageSpec(s, n_stages, groups[s], takes_e=s > 0 and needs_e_after[s - 1], emits_e=needs_e_after[s])
            for s in range(n_stages)]


def owned_modules(spec: StageSpec, m) -> set[str]:
    """Top-level module paths this stage keeps (everything else is removed)."""
    keep = {"rotary"}  # no parameters; every stage turns position ids into cos/sin
    if spec.is_first:
        keep.add("tok_embeddings")
    if spec.is_last:
        keep.add("head")
    for u in spec.units:
        if u.kind == "core":
            keep.add("core")
            if u.index >= 1 and m.reinject == "concat":
                keep.add("inject")
        else:
            keep.add(u.name)
    return keep


class _StageForward:
    """Mixed into a pruned model's class: ``forward`` runs one stage's virtual layers only.

    Inputs: the first stage takes ``tokens``; the others take ``h`` (and ``e`` if ``takes_e``).
    Every stage takes ``position_ids`` / ``doc_ids`` as keyword side inputs. The last stage
    returns logits (the schedule's loss function sums the cross-entropy); the others return
    ``h`` or ``(h, e)``.
    """

    pp_spec: StageSpec

    def forward(self, *inputs, position_ids=None, doc_ids=None):  # noqa: D401
        spec, m = self.pp_spec, self.cfg
        e = None
        if spec.is_first:
            (tokens,) = inputs
            h = self.tok_embeddings(tokens)
            if position_ids is None:
                position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
            if m.arch == "looped" and m.n_prelude == 0:
                e = h
        else:
            h = _contiguous_grad(inputs[0])
            if spec.takes_e:
                e = _contiguous_grad(inputs[1])
            if position_ids is None:
                raise ValueError(f"pipeline stage {spec.index} needs position_ids (a keyword side input).")
        cos, sin = self.rotary(position_ids)
        for u in spec.units:
            if u.kind == "layer":
                h = self.layers[str(u.index)](h, cos, sin, doc_ids)
            elif u.kind == "prelude":
                h = self.prelude[str(u.index)](h, cos, sin, doc_ids)
                if u.index == m.n_prelude - 1:
                    e = h
            elif u.kind == "core":
                h = self.core(self.reinject(h, e, u.index), u.index, cos, sin, doc_ids)
            else:
                h = self.coda[str(u.index)](h, cos, sin, doc_ids)
        if spec.is_last:
            return self.head(h)
        if spec.emits_e:
            if spec.takes_e and not any(u.kind == "prelude" for u in spec.units):
                # e only passes through: send a copy, not the received buffer or a view of it (the
                # zero-bubble schedules detach outputs in place, which a view does not allow)
                e = e.clone()
            return h, e
        return h


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: it is sent to the previous stage
    into a buffer shaped from metadata (a slice of a ``cat``'s gradient would not fit)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _contiguous_grad(x: torch.Tensor) -> torch.Tensor:
    return _ContiguousGrad.apply(x) if x.requires_grad else x


_STAGE_CLASSES: dict = {}


def _stage_class(cls):
    if cls not in _STAGE_CLASSES:
        _STAGE_CLASSES[cls] = type(f"{cls.__name__}Stage", (_StageForward, cls), {})
    return _STAGE_CLASSES[cls]


@torch.no_grad()
def build_stage_model(model: nn.Module, spec: StageSpec, device: torch.device) -> nn.Module:
    """A new model of the same class holding only ``spec``'s parts, with ``model``'s values.

    Built fresh (on meta, pruned, then materialised) rather than deep-copied: a deep copy would
    share the looped core's LoRA forward hooks -- closures over the *original* core -- with the
    copy. Parameter and buffer names are the original ones.
    """
    from longtrain.models import build_model

    m = model.cfg
    with torch.device("meta"):
        stage = build_model(m)
    keep = owned_modules(spec, m)
    for name in ("tok_embeddings", "head", "core", "inject"):
        if name not in keep and getattr(stage, name, None) is not None:
            setattr(stage, name, None)
    for dict_name in ("layers", "prelude", "coda"):
        mdict = getattr(stage, dict_name, None)
        if mdict is None:
            continue
        for key in list(mdict.keys()):
            if f"{dict_name}.{key}" not in keep:
                del mdict[key]
    stage.to_empty(device=device)
    src = dict(model.named_parameters(remove_duplicate=False))
    src.update(dict(model.named_buffers(remove_duplicate=False)))
    for name, t in [*stage.named_parameters(remove_duplicate=False), *stage.named_buffers(remove_duplicate=False)]:
        t.copy_(src[name])
    if getattr(stage, "rotary", None) is not None and hasattr(model.rotary, "mscale"):
        stage.rotary.mscale = model.rotary.mscale
    stage.__class__ = _stage_class(type(stage))
    stage.pp_spec = spec
    return stage
