"""Reductions the trainer needs across the mesh: token counts, logged loss, gradient norm.

Owns: ``all_reduce_sum`` / ``all_reduce_max`` over named mesh dimensions, ``total_norm`` (of any
plain or DTensor tensors) (the global token count
and the logged loss are sums over ``("dp", "sp")``), and ``clip_grad_norm_`` that is exact when
parameters are DTensors sharded over FSDP and tensor-parallel dimensions (and, with pipeline
stages, adds the stages' norms over ``pp``).

Loss convention (the trainer's): every rank returns the SUM of its token losses, ``n`` is the
global count of labelled tokens, each rank backpropagates ``loss_sum / n``; the exact gradient is
then the SUM of the ranks' gradients, which is what ``parallel.fsdp`` reduces.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from longtrain.parallel.mesh import FLAT_DIMS, ParallelDims

# the canonical name of a set of dims: ("dp", "sp") -> "dp_sp"
_ALIASES = {
    frozenset({"dp", "sp"}): "dp_sp",
    frozenset({"dp_replicate", "dp_shard", "sp"}): "dp_sp",
    frozenset({"dp_replicate", "dp_shard"}): "dp",
    frozenset({"dp_shard", "sp"}): "dp_shard_sp",
}


def _group_name(over) -> str:
    names = (over,) if isinstance(over, str) else tuple(over)
    if len(names) == 1:
        return names[0]
    key = frozenset(names)
    if key not in _ALIASES:
        raise ValueError(f"cannot reduce over {names}: use one mesh dim, or one of "
                         f"{sorted(tuple(sorted(k)) for k in _ALIASES)} (flattened views {tuple(FLAT_DIMS)}).")
    return _ALIASES[key]


def _all_reduce(tensor: torch.Tensor, dims: ParallelDims, over, op) -> torch.Tensor:
    name = _group_name(over)
    out = tensor.detach().clone()
    if dims.mesh is None or dims.size(name) == 1:
        return out
    with dims.watch(f"all_reduce({name})"):
        dist.all_reduce(out, op=op, group=dims.get_group(name))
    return out


def all_reduce_sum(tensor: torch.Tensor, dims: ParallelDims, over=("dp", "sp")) -> torch.Tensor:
    """A detached copy of ``tensor`` summed over the named dims (no-op in one process)."""
    return _all_reduce(tensor, dims, over, dist.ReduceOp.SUM)


def all_reduce_max(tensor: torch.Tensor, dims: ParallelDims, over=("dp", "sp")) -> torch.Tensor:
    return _all_reduce(tensor, dims, over, dist.ReduceOp.MAX)


def counted_once(parameters: Iterable[torch.Tensor]) -> list:
    """``parameters`` without the copies of a weight several pipeline stages hold (looped core,
    tied embedding): those other than its first stage's are marked ``_pp_replica`` by
    ``parallel.pipeline``, so a sum over ranks counts each weight once."""
    return [p for p in parameters if not getattr(p, "_pp_replica", False)]


@torch.no_grad()
def grad_norm(parameters: Iterable[torch.Tensor], dims: ParallelDims | None = None,
              norm_type: float = 2.0) -> torch.Tensor:
    """The global norm of all gradients, as one plain tensor equal on every rank (``total_norm``
    of the gradients)."""
    grads = [p.grad for p in counted_once(parameters) if p.grad is not None]
    return total_norm(grads, dims, norm_type)


@torch.no_grad()
def total_norm(tensors: Iterable[torch.Tensor], dims: ParallelDims | None = None,
               norm_type: float = 2.0) -> torch.Tensor:
    """The norm of all ``tensors`` together (plain or DTensor), one plain tensor equal on every rank.

    DTensors are grouped by mesh (``get_total_norm`` on DTensors of one mesh gives a Partial result
    that ``full_tensor`` sums over the sharded dims; replicated dims are not double counted). With
    pipeline stages each stage holds different tensors, so the p-th powers are added over ``pp``.
    """
    by_mesh: dict = defaultdict(list)
    for g in tensors:
        by_mesh[g.device_mesh if isinstance(g, DTensor) else None].append(g)
    norms = []
    for mesh, gs in by_mesh.items():
        n = torch.nn.utils.get_total_norm(gs, norm_type=norm_type, foreach=None)
        if isinstance(n, DTensor):
            n = n.full_tensor()
        norms.append(n.float())
    if norms:
        total = torch.linalg.vector_norm(torch.stack(norms), ord=norm_type)
    else:  # no tensors here (e.g. a stage that got no gradients) -- still join the pp reduction below
        total = torch.zeros((), device=dims.device if dims is not None else "cpu")
    if dims is not None and dims.pp > 1:
        if norm_type == float("inf"):
            total = _all_reduce(total, dims, "pp", dist.ReduceOp.MAX)
        else:
            total = _all_reduce(total ** norm_type, dims, "pp", dist.ReduceOp.SUM) ** (1.0 / norm_type)
    return total


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float, dims: ParallelDims | None = None,
                    norm_type: float = 2.0) -> torch.Tensor:
    """Scale gradients so their global norm is at most ``max_norm``; return the norm before."""
    params = [p for p in parameters]
    total = grad_norm(params, dims, norm_type)
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=None)
    return total
