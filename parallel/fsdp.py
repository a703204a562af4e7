"""Data parallelism: FSDP2 (``fully_shard``) over dp_shard x sp, replicated over dp_replicate.

Owns: ``apply_fsdp(model, dims, cfg)`` -- wrapping the FSDP units the model describes
(``fsdp_units``), the mixed-precision policy, and the gradient reduction that makes the result
exactly the single-process gradient. Whether FSDP wraps at all is ``parallel.precision.fsdp_wraps``
(also importable from here), decided once when the mesh is built and kept as ``dims.fsdp``.

- Sharding mesh: Ulysses ranks hold the same parameters as the dp_shard ranks (only their tokens
  differ), so parameters are sharded over the flattened ``dp_shard_sp`` dimension; with
  ``dp_replicate > 1`` the mesh is 2-D (``dp_replicate``, ``dp_shard_sp``): HSDP, sharded inside a
  group, all-reduced across groups.
- Units: what the model's ``shard_units()`` lists -- every transformer block of the Llama / the
  looped prelude and coda, the looped core as ONE unit (its layers and per-loop LoRA are used R
  times per forward, so they are gathered once and kept -- ``reshard_after_forward=False`` --
  instead of R all-gathers, and their gradients accumulate across the R backward passes before
  reduction) -- and the root (everything else: embedding, head, re-injection projection).
- Gradient scale: each rank backpropagates ``loss_sum_local / n_global`` (n counted over dp and
  sp), so the exact gradient is the SUM over ranks. FSDP averages by default; here the divide
  factor is 1 and only sum reductions are used (``set_force_sum_reduction_for_comms``, also
  needed by gloo, which has no pre-multiplied sum).
- No data-parallel peers in bf16 (one process, or tensor / pipeline parallelism alone): FSDP2
  over a one-rank mesh, used for its mixed precision only (why: ``parallel.precision``).
  ``parallel.param_dtype=fp32`` turns it off. One process gets its one-rank group from
  ``parallel.mesh.init_distributed``; with tp or pp the mesh is the size-1 ``dp_shard_sp`` view
  (composed with the tp placements like any FSDP2 x TP mesh; each pipeline stage is wrapped).
- ``memory.fsdp_cpu_offload``: every unit gets FSDP2's ``CPUOffloadPolicy`` (sharded fp32
  parameters and their gradients live in pinned host memory, copied to the GPU for each unit's
  gather; the optimizer steps on the host, ``longtrain.memory.optimizer_offload.build_optimizer``).
  It asks for the one-rank wrapping too, so one process can drop its static GPU memory (16 bytes a
  parameter) as a ZeRO-3 run with ``offload_param`` does.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from longtrain.memory.optimizer_offload import fsdp_offload_policy
from longtrain.models.units import DescribedModel, ShardUnit
from longtrain.parallel.precision import fsdp_wraps, param_dtype_name

__all__ = ["apply_fsdp", "fsdp_mesh", "fsdp_units", "fsdp_wraps", "mixed_precision"]

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def mixed_precision(cfg, device: torch.device) -> MixedPrecisionPolicy:
    return MixedPrecisionPolicy(param_dtype=_DTYPES[param_dtype_name(cfg, device.type)],
                                reduce_dtype=_DTYPES[cfg.parallel.reduce_dtype])


def fsdp_mesh(dims):
    """The mesh FSDP shards and replicates over (1-D, or 2-D for HSDP)."""
    if dims.dp_replicate > 1:
        # (dp_replicate, dp_shard_sp) as one 2-D mesh: unflattened from the dp_sp view, because
        # slicing a flattened dim together with a root dim out of the root mesh is deprecated
        return dims.get_mesh("dp_sp")._unflatten(
            0, (dims.dp_replicate, dims.size("dp_shard_sp")), ("hsdp_replicate", "hsdp_shard"))
    return dims.get_mesh("dp_shard_sp")


def fsdp_units(model: nn.Module) -> list[ShardUnit]:
    """The FSDP units below the root, as the model describes them (``DescribedModel.shard_units``).

    A model that cannot describe itself is an error, not one unit for everything: the whole model
    gathered at once is the memory FSDP exists to avoid. So is a description that leaves a
    transformer block to the root unit.
    """
    if not isinstance(model, DescribedModel):
        raise TypeError(
            f"apply_fsdp: {type(model).__name__} does not describe its units (it is not a "
            f"longtrain.models.units.DescribedModel), so FSDP cannot tell which modules to shard "
            f"separately, and wrapping it whole would gather every parameter at once. Derive it from "
            f"DescribedModel and implement shard_units() and blocks().")
    units = model.shard_units()
    inside = {id(m) for u in units for m in u.module.modules()}
    loose = [b.name for b in model.blocks() if id(b.module) not in inside]
    if loose:
        raise ValueError(f"apply_fsdp: {type(model).__name__}.shard_units() leaves the blocks {loose} to the "
                         f"root unit, which FSDP would keep gathered for the whole step; list them there.")
    return units


def apply_fsdp(model: nn.Module, dims, cfg) -> nn.Module:
    """Wrap ``model`` with FSDP2 in place; returns it (now also an ``FSDPModule``)."""
    if not dims.fsdp:
        return model
    mesh = fsdp_mesh(dims)
    kw = {"mesh": mesh, "mp_policy": mixed_precision(cfg, dims.device)}
    if (offload := fsdp_offload_policy(cfg)) is not None:
        kw["offload_policy"] = offload
    for unit in fsdp_units(model):
        fully_shard(unit.module, reshard_after_forward=unit.reshard_after_forward, **kw)
    # the root's parameters (embedding, head) are needed again first thing in backward
    fully_shard(model, reshard_after_forward=False, **kw)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    return model
