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
- No data-parallel peers in bf16 (one process, or tensor / pipeline parallelism alone): FSDP2
  over a one-rank mesh, used for its mixed precision only (bf16 weights for the matmuls and a
  bf16 residual stream over fp32 master weights), so such a run computes in the same precision
  as a data-parallel one and keeps half the activation bytes; plain bf16 autocast over fp32
  weights would leave the stream -- every saved or offloaded layer input -- in fp32.
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

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def param_dtype_name(cfg, device_type: str) -> str:
    """``parallel.param_dtype`` resolved: "auto" follows the run's compute dtype
    (``schedule.dtype``, itself bf16 on GPU and fp32 on CPU when "auto")."""
    param = cfg.parallel.param_dtype
    if param == "auto":
        compute = cfg.schedule.dtype
        if compute == "auto":
            compute = "bf16" if device_type == "cuda" else "fp32"
        param = compute
    return param


def mixed_precision(cfg, device: torch.device) -> MixedPrecisionPolicy:
    return MixedPrecisionPolicy(param_dtype=_DTYPES[param_dtype_name(cfg, device.type)],
                                reduce_dtype=_DTYPES[cfg.parallel.reduce_dtype])


def wants_one_rank_fsdp(cfg, dims, device_type: str) -> bool:
    """No data-parallel peers (one process, or tensor/pipeline parallelism only) yet bf16 weights
    wanted for compute: FSDP2 over each rank's one-rank data-parallel mesh gives that -- bf16
    weights and residual stream over fp32 master weights, as with many data-parallel ranks.

    Without it such a run keeps fp32 weights under bf16 autocast, and autocast leaves the residual
    stream (every saved or offloaded layer input) fp32: twice the activation bytes.
    """
    no_peers = dims.dp_replicate * dims.dp_shard * dims.sp == 1
    return no_peers and (param_dtype_name(cfg, device_type) == "bf16" or cfg.memory.fsdp_cpu_offload)


def one_rank_note(cfg, device_type: str) -> str:
    """What the one-rank wrapping is for, as the mesh line at start-up says it."""
    if param_dtype_name(cfg, device_type) == "bf16":
        note = ("bf16 weights and residual stream over fp32 master weights (FSDP2 on one rank; "
                "parallel.param_dtype=fp32 turns it off)")
    else:
        note = "FSDP2 on one rank, fp32 weights"
    if cfg.memory.fsdp_cpu_offload:
        note += "; parameters, gradients and optimizer state in host memory (memory.fsdp_cpu_offload)"
    return note


def fsdp_mesh(dims):
    """The mesh FSDP shards and replicates over (1-D, or 2-D for HSDP)."""
    if dims.dp_replicate > 1:
        # (dp_replicate, dp_shard_sp) as one 2-D mesh: unflattened from the dp_sp view, because
        # slicing a flattened dim together with a root dim out of the root mesh is deprecated
        return dims.get_mesh("dp_sp")._unflatten(
            0, (dims.dp_replicate, dims.size("dp_shard_sp")), ("hsdp_replicate", "hsdp_shard"))
    return dims.get_mesh("dp_shard_sp")


def uses_fsdp(dims) -> bool:
    return dims.dp_replicate * dims.dp_shard * dims.sp > 1 or getattr(dims, "one_rank_fsdp", False)


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
    kw = {"mesh": mesh, "mp_policy": mixed_precision(cfg, dims.device)}
    if (offload := fsdp_offload_policy(cfg)) is not None:
        kw["offload_policy"] = offload
    for module, reshard in _units(model):
        fully_shard(module, reshard_after_forward=reshard, **kw)
    # the root's parameters (embedding, head) are needed again first thing in backward
    fully_shard(model, reshard_after_forward=False, **kw)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    return model
