"""Data parallelism: FSDP2 (``fully_shard``) over dp_shard x sp, replicated over dp_replicate.

Owns: ``apply_fsdp(model, dims, cfg)`` -- which modules become FSDP units, the mixed-precision
policy, and the gradient reduction that makes the result exactly the single-process gradient.

- Sharding mesh: Ulysses ranks hold the same parameters as the dp_shard ranks (only their tokens
  differ), so parameters are sharded over the flattened ``dp_shard_sp`` dimension; with
  ``dp_replicate > 1`` the mesh is 2-D (``dp_replicate``, ``dp_shard_sp``): HSDP, sharded inside a
  group, all-reduced across groups.
- Units: every transformer ``Block`` of the Llama / the looped prelude and coda, the looped core as
  ONE unit (its layers and per-loop LoRA are used R times per forward, so they are gathered once
  and kept -- ``reshard_after_forward=False`` -- instead of R all-gathers, and their gradients
  accumulate across the R backward passes before reduction), and the root (embedding, head,
  re-injection projection).
- Gradient scale: each rank backpropagates ``loss_sum_local / n_global`` (n counted over dp and
  sp), so the exact gradient is the SUM over ranks. FSDP averages by default; here the divide
  factor is 1 and only sum reductions are used (``set_force_sum_reduction_for_comms``, also
  needed by gloo, which has no pre-multiplied sum).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def mixed_precision(cfg, device: torch.device) -> MixedPrecisionPolicy:
    p = cfg.parallel
    param = p.param_dtype
    if param == "auto":  # follow the run's compute dtype: schedule.dtype=fp32 means fp32 everywhere
        compute = cfg.schedule.dtype
        if compute == "auto":
            compute = "bf16" if device.type == "cuda" else "fp32"
        param = compute
    return MixedPrecisionPolicy(param_dtype=_DTYPES[param], reduce_dtype=_DTYPES[p.reduce_dtype])


def fsdp_mesh(dims):
    """The mesh FSDP shards and replicates over (1-D, or 2-D for HSDP)."""
    if dims.dp_replicate > 1:
        # (dp_replicate, dp_shard_sp) as one 2-D mesh: unflattened from the dp_sp view, because
        # slicing a flattened dim together with a root dim out of the root mesh is deprecated
        return dims.get_mesh("dp_sp")._unflatten(
            0, (dims.dp_replicate, dims.size("dp_shard_sp")), ("hsdp_replicate", "hsdp_shard"))
    return dims.get_mesh("dp_shard_sp")


def uses_fsdp(dims) -> bool:
    return dims.dp_replicate * dims.dp_shard * dims.sp > 1


def _units(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """(module, reshard_after_forward) for every FSDP unit below the root, in forward order.

    Read from the models' containers (``layers`` / ``prelude`` / ``coda`` ModuleDicts, the looped
    ``core``) rather than by type, so a block replaced by a wrapper is still one unit.
    """
    units = []
    for attr in ("layers", "prelude", "core", "coda"):
        part = getattr(model, attr, None)
        if isinstance(part, nn.ModuleDict):
            units += [(block, True) for block in part.values()]
        elif isinstance(part, nn.Module):
            units.append((part, False))  # the looped core: one unit, gathered once for R calls
    return units


def apply_fsdp(model: nn.Module, dims, cfg) -> nn.Module:
    """Wrap ``model`` with FSDP2 in place; returns it (now also an ``FSDPModule``)."""
    if not uses_fsdp(dims):
        return model
    mesh = fsdp_mesh(dims)
    mp = mixed_precision(cfg, dims.device)
    for module, reshard in _units(model):
        fully_shard(module, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    # the root's parameters (embedding, head) are needed again first thing in backward
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    return model
