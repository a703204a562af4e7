"""Cutting a model into pipeline stages: balanced boundaries over its units, pruned stage models.

Owns: the stage boundaries (``stage_boundaries``: balanced automatically or given by
``parallel.pp_boundaries``), which rank runs which stage (``stage_ranks``), what each stage runs
(``plan_stages`` -> ``StageSpec``) and ``build_stage_model`` -- a copy of the model that keeps only
what one stage uses and whose ``forward`` runs only that stage.

The idea (torchtitan's): a stage is the model itself with the parts it does not use removed, so
parameter names (``layers.5.attention.wq.weight``) are the same as in the whole model and
``parallelize`` / checkpoints treat a stage like a smaller model. The model describes itself
(``longtrain.models.units``): its forward pass is a list of units -- the embedding, then the
*virtual layers* the stages are cut from, then the head -- and ``forward_units`` runs any
contiguous run of them, so a stage runs the model's own code. A Llama's virtual layers are its
blocks ``layers.0 .. layers.L-1``; a looped transformer is *unrolled*: ``prelude.0 ..``, one
virtual layer per core iteration ``core@0 .. core@R-1`` (each runs all ``n_core`` shared blocks
with that iteration's LoRA), ``coda.0 ..``. Every stage running at least one iteration holds a copy
of the core (and what else that iteration's unit uses); ``parallel.pipeline`` sums those copies'
gradients so training equals one process. The embedding belongs to the first stage and the head
to the last. The units are read from the config (``models.units_of``), so the loop count must be
fixed (``model.loops``).

What travels between stages: the one activation tensor the model's units pass on (for a looped
model, while a later iteration still re-injects the prelude output, ``[h, e]`` on the last dim).
Position ids and document ids are *not* passed along: every stage receives the micro-batch's side
inputs as keyword arguments from the schedule (all ranks of one pipeline read the same batch),
which keeps the p2p traffic to the activations and needs no integer tensors in the backward pass.

Cost (``models.units.unit_cost``: forward FLOPs per token, backward is proportional): matmuls,
causal attention, and for the head the cross-entropy. Boundaries minimise the most expensive
stage, and among those splits the sum of squared stage costs (so spare slack is spread, not piled
on one stage).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from longtrain.config import ConfigError
from longtrain.models import DescribedModel, units_of
from longtrain.models.units import Unit, unit_cost

def virtual_layers(m) -> list[Unit]:
    """The units of the model with config ``m`` that stages are cut from, in execution order."""
    return [u for u in units_of(m) if u.is_layer]


def _pinned_costs(m, seq_len: int) -> tuple[float, float]:
    """Cost of the units before the first virtual layer (the first stage's: the embedding) and
    after the last (the last stage's: the head)."""
    units = units_of(m)
    layers = [i for i, u in enumerate(units) if u.is_layer]
    first = sum(unit_cost(m, u, seq_len) for u in units[:layers[0]])
    last = sum(unit_cost(m, u, seq_len) for u in units[layers[-1] + 1:])
    return first, last


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
    units = virtual_layers(m)
    names = ", ".join(f"{i}:{u.name}" for i, u in enumerate(units))
    if len(units) < n_stages:
        raise ConfigError(
            f"the model has {len(units)} virtual layers ({names}) but the pipeline needs {n_stages} "
            f"non-empty stages (parallel.pp={cfg.parallel.pp}"
            + (f" x parallel.pp_virtual_stages={cfg.parallel.pp_virtual_stages}" if n_stages > cfg.parallel.pp else "")
            + "); use fewer stages or a deeper model.")
    given = cfg.parallel.pp_boundaries
    if given is None or len(given) == 0:
        first, last = _pinned_costs(m, cfg.data.seq_len)
        return balance([unit_cost(m, u, cfg.data.seq_len) for u in units], n_stages, first, last)
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
    """What one stage runs: its virtual layers (``units``) and, with the embedding on the first
    stage and the head on the last, every unit it runs (``run``, what ``forward_units`` takes)."""

    index: int
    n_stages: int
    units: tuple  # models.units.Unit, the virtual layers, in order
    run: tuple  # models.units.Unit, everything this stage runs, in order

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.n_stages - 1

    def describe(self) -> str:
        return f"stage {self.index}: " + " ".join(u.name for u in self.run)


def plan_stages(cfg, n_stages: int, boundaries: Optional[list[int]] = None) -> list[StageSpec]:
    every = units_of(cfg.model)
    units = virtual_layers(cfg.model)
    b = stage_boundaries(cfg, n_stages) if boundaries is None else list(boundaries)
    starts = [0] + b
    ends = b + [len(units)]
    specs = []
    for s, (lo, hi) in enumerate(zip(starts, ends)):
        # the run in the whole unit list: from the first unit (embedding) on the first stage, to
        # the last (head) on the last one
        a = 0 if s == 0 else every.index(units[lo])
        z = len(every) if s == n_stages - 1 else every.index(units[hi - 1]) + 1
        specs.append(StageSpec(s, n_stages, tuple(units[lo:hi]), tuple(every[a:z])))
    return specs


def owned_modules(spec: StageSpec) -> set[str]:
    """Qualified names of the modules whose parameters this stage holds."""
    return {name for u in spec.run for name in u.modules}


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: it is sent to the previous stage
    into a buffer shaped from metadata (a slice of a ``cat``'s gradient would not fit)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _contiguous_input_grads(module, args):
    """Forward pre-hook of a stage model: received activations get contiguous gradients."""
    return tuple(_ContiguousGrad.apply(a) if isinstance(a, torch.Tensor) and a.requires_grad else a
                 for a in args)


@torch.no_grad()
def build_stage_model(model: DescribedModel, spec: StageSpec, device: torch.device) -> DescribedModel:
    """A new model of the same class holding only what ``spec`` runs, with ``model``'s values;
    its ``forward(x, position_ids=..., doc_ids=...)`` runs ``spec.run``.

    Built fresh (on meta, pruned, then materialised) rather than deep-copied, so the whole model
    is never held twice. Parameter and buffer names are the original ones.
    """
    with torch.device("meta"):
        stage = type(model)(model.cfg)
    stage.prune_to(spec.run)
    stage.to_empty(device=device)
    src = dict(model.named_parameters(remove_duplicate=False))
    src.update(dict(model.named_buffers(remove_duplicate=False)))
    for name, t in [*stage.named_parameters(remove_duplicate=False), *stage.named_buffers(remove_duplicate=False)]:
        t.copy_(src[name])
    stage.register_forward_pre_hook(_contiguous_input_grads)
    return stage
