"""The dtype parameters are computed in, and whether FSDP2 wraps the model: one rule for all.

Owns: ``param_dtype_name`` (``parallel.param_dtype`` resolved), ``fsdp_wraps`` (the one answer to
"does FSDP2 wrap this model", from plain sizes and settings, so the mesh, ``parallel.fsdp`` and the
memory planner -- which has no mesh -- all ask the same function) and ``one_rank_note`` (what a
one-rank wrapping is for, on the start-up mesh line).

FSDP2 wraps the model when parameters are sharded or replicated over data-parallel peers
(``dp_replicate * dp_shard * sp > 1``), and also with no peers (one process, or tensor / pipeline
parallelism alone) when the run computes in bf16 or keeps parameters in host memory: a one-rank
FSDP2 gives bf16 weights and a bf16 residual stream over fp32 master weights (plain bf16 autocast
over fp32 weights would leave the stream -- every saved or offloaded layer input -- in fp32, twice
the bytes), and ``memory.fsdp_cpu_offload`` is FSDP2's ``CPUOffloadPolicy``. The module has no
import of ``parallel.fsdp`` so the mesh can use it without pulling FSDP in.
"""

from __future__ import annotations


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


def fsdp_wraps(dp_replicate: int, dp_shard: int, sp: int, param_dtype_name: str, fsdp_cpu_offload: bool) -> bool:
    """Whether FSDP2 wraps the model: data-parallel peers, or none but bf16 weights or host-memory
    parameters wanted (see the module docstring)."""
    if dp_replicate * dp_shard * sp > 1:
        return True
    return param_dtype_name == "bf16" or fsdp_cpu_offload


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
