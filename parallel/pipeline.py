"""Pipeline parallelism: this rank's stages, the schedule that runs them, shared-weight gradients.

Owns: ``build_pipeline(model, dims, cfg)`` -> ``PipelineModel`` (what the trainer holds as
``model`` when ``parallel.pp > 1``), the schedule choice, the micro-batch count, and the
gradient sum of weights that several stages hold (the looped core, tied embeddings).

Order (torchtitan's): split the plain model into stage models (``pipeline_split``), then apply
``parallelize`` (TP -> Ulysses -> memory policy -> compile -> FSDP2) to *each stage model*, then
wrap each in ``torch.distributed.pipelining.PipelineStage`` over the mesh's ``pp`` group. The mesh
keeps ``pp`` outermost (``parallel.mesh``): a pipeline hop is one point-to-point send per
micro-batch, the cheapest traffic, so it may cross nodes while tp / sp / FSDP stay inside.

Schedules (``parallel.pp_schedule``), all from ``torch.distributed.pipelining``:

- ``gpipe``            ``ScheduleGPipe``: all forwards, then all backwards; one stage per rank.
- ``1f1b``             ``Schedule1F1B``: one forward, one backward in steady state; one stage per rank.
- ``interleaved_1f1b`` ``ScheduleInterleaved1F1B``: ``pp_virtual_stages`` stages per rank, placed
  round-robin (stage s on rank s % pp): a bubble ``v`` times smaller.
- ``zero_bubble``      ``ScheduleInterleavedZeroBubble`` (ZB1P): like interleaved, and each backward
  is split into input-gradient and weight-gradient parts so weight work fills the bubble. Chosen
  over ``ScheduleZBVZeroBubble`` because it takes any ``pp_virtual_stages`` and the same stage
  placement as interleaved 1F1B (ZBV needs exactly two stages per rank in a V placement).

Micro-batches: the step's global batch on this data-parallel rank (``grad_accum`` x
``data.batch_size`` rows) is cut into ``parallel.pp_microbatches`` (0 -> 2 x pp) equal row
chunks. Side inputs (position ids, document ids) go to every stage as keyword inputs; tokens go
to the first stage; labels to the last.

Loss (trainer/step.py's convention): the last stage's loss function returns
``sum of token losses / global token count``; ``scale_grads=False`` so the schedule does not
divide by the micro-batch count. The sum over micro-batches and ranks is the global mean.

Shared weights. A weight held by several stages (the looped core and its LoRA on every stage
running one of its iterations; the tied embedding / head) exists as one copy per stage. After
the schedule, each copy's gradient is replaced by the sum over all copies: summed locally
(several stages on one rank), then all-reduced over the pp ranks that hold it. Every copy then
takes the same optimizer step and stays equal. The gradient norm counts one copy only: the
others are marked ``_pp_replica`` and ``parallel.reduce.counted_once`` leaves them out.

What the instability monitors ask (``trainer/stability.py``): ``blocks()``, ``loss_head()`` and
``on_loop_output`` answer for this rank's stages as a model answers for itself, with the whole
model's names; ``in_shape_inference()`` is true while torch's schedule runs a stage forward only to
infer shapes (its first step, and the first after switching between training and evaluation),
whose inputs are not the batch's.

Checkpoint names. ``PipelineModel`` holds its stages as ``parts.<i>``, so ``get_state_dict`` names
a weight ``parts.1.layers.5.attention.wq.weight``. ``checkpoint_key`` gives the whole model's name
instead (the stage models keep the full model's names, so dropping ``parts.<i>.`` is enough; for
optimizer state a tied weight also takes the name the whole model's optimizer uses). The
checkpoint manager saves under those names, so a checkpoint loads into any pipeline split, or none.
"""

from __future__ import annotations

import functools
import re
import threading
from collections import defaultdict

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)
from torch.distributed.tensor import DTensor

from longtrain.config import ConfigError
from longtrain.models.llama import cross_entropy_sum
from longtrain.parallel.parallelize import parallelize
from longtrain.parallel.pipeline_split import (
    MULTI_STAGE_SCHEDULES,
    build_stage_model,
    check_pipeline_config,
    n_pipeline_stages,
    owned_modules,
    plan_stages,
    stage_ranks,
)
from longtrain.parallel.reduce import all_reduce_sum


_inference = threading.local()
# the PipelineStage methods that run a stage forward on metadata-inference inputs (torch >= 2.12
# and earlier releases)
_INFERENCE_METHODS = ("_forward_metadata_inference", "_shape_inference")


def in_shape_inference() -> bool:
    """True while a schedule runs a stage's forward to infer its input and output shapes (the
    first step, and the first after switching between ``step`` and ``loss_sum``): the first stage
    sees a real micro-batch, later stages uninitialised tensors, and none of it is the step's
    computation. The instability monitors skip these forwards."""
    return getattr(_inference, "active", False)


def _mark_shape_inference(stage: PipelineStage) -> bool:
    """Make ``in_shape_inference()`` true during ``stage``'s metadata-inference forward; False
    when this torch has none of the known methods."""
    marked = False
    for name in _INFERENCE_METHODS:
        infer = getattr(stage, name, None)
        if infer is None:
            continue

        @functools.wraps(infer)
        def inferring(*args, _infer=infer, **kwargs):
            _inference.active = True
            try:
                return _infer(*args, **kwargs)
            finally:
                _inference.active = False

        setattr(stage, name, inferring)
        marked = True
    return marked


def schedule_class(name: str):
    return {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B,
            "zero_bubble": ScheduleInterleavedZeroBubble}[name]


def n_microbatches(cfg) -> int:
    p = cfg.parallel
    n = p.pp_microbatches or 2 * p.pp
    if n < 1:
        raise ConfigError(f"parallel.pp_microbatches={p.pp_microbatches} must be >= 1, or 0 for 2 x pp.")
    rows = cfg.data.batch_size * cfg.schedule.grad_accum
    if rows % n:
        raise ConfigError(
            f"the pipeline cuts data.batch_size * schedule.grad_accum = {cfg.data.batch_size} * "
            f"{cfg.schedule.grad_accum} = {rows} rows per step into parallel.pp_microbatches={n} equal "
            f"micro-batches, which does not divide; choose pp_microbatches among the divisors of {rows}.")
    return n


_PART_PREFIX = re.compile(r"^parts\.\d+\.")


def _under(fqn: str, modules: set[str]) -> bool:
    """Whether the parameter ``fqn`` belongs to one of ``modules`` (qualified module names)."""
    return any(fqn.startswith(m + ".") for m in modules)


class PipelineModel(nn.Module):
    """This rank's stage models (``parts``, each parallelized) and the schedule that runs them.

    ``step(batches, n_global)`` runs forward + backward of one optimizer step and returns this
    pipeline's summed token loss (identical on its pp ranks); ``loss_sum(batch)`` evaluates.
    Calling the module directly is an error: a pipeline has no single-rank forward.
    """

    def __init__(self, parts, stages, schedule, specs, ranks, dims, n_microbatches: int):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.stages = stages
        self.schedule = schedule
        self.specs = specs
        self.stage_rank = ranks
        self.dims = dims
        self.n_microbatches = n_microbatches
        self.has_first = any(s.is_first for s in stages)
        self.has_last = any(s.is_last for s in stages)
        self._denominator = torch.ones((), device=dims.device)
        self.z_loss = 0.0  # optim.z_loss, set by build_pipeline
        self._shared: list = []  # (group or None, [(name, [local copies])]) -- see _plan_shared
        # a tied weight's other names -> the name the whole model's optimizer state uses (its first)
        self.tied_names: dict[str, str] = {}

    def forward(self, *args, **kwargs):
        raise TypeError("a PipelineModel has no plain forward: the trainer calls step() "
                        "(trainer.step.forward_backward) and loss_sum() (evaluate).")

    def loss_fn(self, logits, labels):
        # the pipeline computes the loss from the last stage's logits, so the head's z-loss
        # (``optim.z_loss``, training only, as ``LMHead`` adds it) is added here
        z_loss = self.z_loss if self.training else 0.0
        return cross_entropy_sum(logits, labels, z_loss) / self._denominator.to(torch.float32)

    def _inputs(self, batches: list[dict]):
        dev = self.dims.device
        cat = {k: torch.cat([b[k] for b in batches]).to(dev, non_blocking=True)
               for k in ("tokens", "labels", "position_ids", "doc_ids") if k in batches[0]}
        args = (cat["tokens"],) if self.has_first else ()
        kwargs = {k: cat[k] for k in ("position_ids", "doc_ids") if k in cat}
        target = cat["labels"] if self.has_last else None
        return args, kwargs, target

    def _pipeline_sum(self, losses: list) -> torch.Tensor:
        local = torch.zeros((), dtype=torch.float64, device=self.dims.device)
        for loss in losses:
            local += loss.detach().double()
        local *= self._denominator.double()
        return all_reduce_sum(local, self.dims, over="pp")  # only the last stage's rank adds

    def step(self, batches: list[dict], n_global: torch.Tensor) -> torch.Tensor:
        """Forward + backward over the micro-batches; returns this rank's token-loss sum."""
        args, kwargs, target = self._inputs(batches)
        self._denominator = n_global.clamp(min=1).detach()
        losses: list = []
        self.schedule.step(*args, target=target, losses=losses if self.has_last else None,
                           return_outputs=False, **kwargs)
        self.sync_shared_grads()
        return self._pipeline_sum(losses)

    @torch.no_grad()
    def loss_sum(self, batch: dict) -> torch.Tensor:
        """Summed token loss of one batch (forward only), identical on this pipeline's ranks."""
        args, kwargs, target = self._inputs([batch])
        self._denominator = torch.ones((), device=self.dims.device)
        losses: list = []
        self.schedule.eval(*args, target=target, losses=losses if self.has_last else None, **kwargs)
        return self._pipeline_sum(losses)

    # ------------------------------------------------------------------ what this rank runs

    def blocks(self) -> list:
        """The blocks of this rank's stages (``models.units.BlockRef``), named as in the whole
        model (the stage models keep its names); a looped core on several local stages is listed
        once per copy. The instability monitors hook these."""
        return [ref for part in self.parts for ref in part.blocks()]

    def loss_head(self) -> nn.Module | None:
        """The head of the last stage when this rank runs it, else None."""
        return next((head for part in self.parts if (head := part.loss_head()) is not None), None)

    def on_loop_output(self, fn) -> list:
        """``fn(iteration, output)`` after every core iteration this rank's stages run (global
        iteration indices); the hook handles."""
        return [h for part in self.parts for h in part.on_loop_output(fn)]

    # ------------------------------------------------------------------ shared weights

    @torch.no_grad()
    def sync_shared_grads(self) -> None:
        """Every copy of a shared weight gets the sum of all copies' gradients."""
        for group, entries in self._shared:
            totals = []
            for _, copies in entries:
                grads = [_local(p.grad) for p in copies if p.grad is not None]
                totals.append(torch.stack(grads).sum(0) if grads else torch.zeros_like(_local(copies[0])))
            if group is not None:
                flat = torch.cat([t.reshape(-1) for t in totals])
                dist.all_reduce(flat, group=group)
                offset = 0
                for i, t in enumerate(totals):
                    totals[i] = flat[offset:offset + t.numel()].view_as(t)
                    offset += t.numel()
            for (_, copies), total in zip(entries, totals):
                for p in copies:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    _local(p.grad).copy_(total)

    # ------------------------------------------------------------------ checkpoint names

    def checkpoint_key(self, key: str, optimizer: bool = False) -> str:
        """The whole model's name for a ``get_state_dict`` key of this module.

        ``key`` is a parameter/buffer name (model state) or, with ``optimizer``, that name followed
        by the state's own path (``parts.1.head.output.weight.exp_avg``). Copies of a shared weight
        (on several stages of this rank) all map to one name; the checkpoint keeps one of them.
        """
        key = _PART_PREFIX.sub("", key, count=1)
        if optimizer:  # the whole model's optimizer keys a tied weight by its first name only
            for alias, first in self.tied_names.items():
                if key == alias or key.startswith(alias + "."):
                    return first + key[len(alias):]
        return key

    def describe(self) -> str:
        n = len(self.specs)
        lines = [f"pipeline: {n} stages over pp={self.dims.pp}, {type(self.schedule).__name__}, "
                 f"{self.n_microbatches} micro-batches"]
        lines += [f"  rank {self.stage_rank[s.index]} {s.describe()}" for s in self.specs]
        return "\n".join(lines)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


def _pp_subgroups(dims, pp_ranks: tuple[int, ...]):
    """This rank's process group over the given pp coordinates (same position in the other dims).

    Every rank must call this in the same order (``new_group`` is collective over the world).
    """
    if len(pp_ranks) == dims.pp:
        return dims.get_group("pp")
    grid = dims.mesh.mesh.reshape(dims.pp, -1)
    mine = None
    for col in range(grid.shape[1]):
        ranks = [int(grid[p, col]) for p in pp_ranks]
        g = dist.new_group(ranks)
        if dims.rank in ranks:
            mine = g
    return mine


def _plan_shared(pm: PipelineModel, model: nn.Module, local_stages: list[int]) -> None:
    """Find weights held by several stages; mark all but the first stage's copy as replicas."""
    aliases: dict[int, list[str]] = defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases[id(p)].append(name)
    canonical = {a: names[0] for names in aliases.values() for a in names}
    pm.tied_names = {a: c for a, c in canonical.items() if a != c}
    holders: dict[str, list[int]] = defaultdict(list)
    for spec in pm.specs:
        keep = owned_modules(spec)
        for names in aliases.values():
            if any(_under(a, keep) for a in names):
                holders[names[0]].append(spec.index)
    shared = {c: h for c, h in holders.items() if len(h) > 1}
    by_ranks: dict[tuple, list[str]] = defaultdict(list)
    for c in sorted(shared):
        by_ranks[tuple(sorted({pm.stage_rank[s] for s in shared[c]}))].append(c)
    for rank_set in sorted(by_ranks):
        group = _pp_subgroups(pm.dims, rank_set) if len(rank_set) > 1 else None
        if pm.dims.pp_rank not in rank_set:
            continue
        entries = []
        for c in by_ranks[rank_set]:
            copies = []
            for part, s in zip(pm.parts, local_stages):
                for name, p in part.named_parameters():
                    if canonical.get(name) == c and all(p is not q for q in copies):
                        copies.append(p)
                        if s != shared[c][0]:
                            p._pp_replica = True  # parallel.reduce.counted_once keeps the owner only
            entries.append((c, copies))
        pm._shared.append((group, entries))


def build_pipeline(model: nn.Module, dims, cfg) -> PipelineModel:
    """Split ``model`` into stages, parallelize each, and build the schedule; see module doc."""
    check_pipeline_config(cfg)
    n_stages = n_pipeline_stages(cfg.parallel)
    specs = plan_stages(cfg, n_stages)
    ranks = stage_ranks(dims.pp, n_stages)
    local = [s for s in range(n_stages) if ranks[s] == dims.pp_rank]
    n_mb = n_microbatches(cfg)
    parts = []
    for s in local:
        part = build_stage_model(model, specs[s], dims.device)
        parts.append(parallelize(part, dims, cfg))
    group = dims.get_group("pp")
    stages = [PipelineStage(part, stage_index=s, num_stages=n_stages, device=dims.device, group=group)
              for part, s in zip(parts, local)]
    marked = [_mark_shape_inference(stage) for stage in stages]
    if cfg.logging.stability_every and not all(marked):
        raise ConfigError(f"logging.stability_every={cfg.logging.stability_every} with parallel.pp={dims.pp}: this "
                          f"torch {torch.__version__} has none of the PipelineStage methods {_INFERENCE_METHODS} "
                          f"the monitors need to skip its shape-inference forward; set logging.stability_every=0.")
    pm = PipelineModel(parts, stages, None, specs, ranks, dims, n_mb)
    pm.z_loss = cfg.optim.z_loss
    cls = schedule_class(cfg.parallel.pp_schedule)
    if cfg.parallel.pp_schedule in MULTI_STAGE_SCHEDULES:
        pm.schedule = cls(stages, n_microbatches=n_mb, loss_fn=pm.loss_fn, scale_grads=False)
    else:
        pm.schedule = cls(stages[0], n_microbatches=n_mb, loss_fn=pm.loss_fn, scale_grads=False)
    _plan_shared(pm, model, local)
    return pm
