"""``parallelize(model, dims, cfg)``: every parallelism applied to a plain model, in one order.

Owns the order, which matters:

1. tensor / sequence parallel (DTensor plans on the full, unsharded linears)
2. Ulysses (wraps each ``Attention.core``; sees local q/k/v after the tp split)
3. activation memory policy (``longtrain.memory``: recompute / offload around the finished blocks)
4. ``torch.compile`` per block (after the wrappers it must trace, before FSDP's hooks)
5. FSDP2 (shards whatever parameters -- plain or DTensor -- the steps above left)

Works for ``Llama`` and ``Looped`` (its shared core is just more ``Block``s plus its LoRA). In a
single process nothing is distributed and only the memory policy (and compile) apply. Pipeline
stages are split off before this, as their own step; ``parallel.pp > 1`` is refused until then.
"""

from __future__ import annotations

import torch.nn as nn

from longtrain.models.llama import Block
from longtrain.parallel.fsdp import apply_fsdp, uses_fsdp
from longtrain.parallel.tensor_parallel import apply_tensor_parallel, replicate_partial_grads
from longtrain.parallel.ulysses import apply_ulysses


def _apply_memory_policy(model: nn.Module, cfg) -> nn.Module:
    try:
        from longtrain import memory
    except ImportError:
        return model
    fn = getattr(memory, "apply_activation_memory", None)
    if fn is None:  # memory/ is written in parallel with this; absent = no policy yet
        return model
    out = fn(model, cfg)
    return model if out is None else out


def _compile_blocks(model: nn.Module) -> None:
    # per block, in place (nn.Module.compile keeps parameter names: no "_orig_mod." prefix)
    for m in model.modules():
        if isinstance(m, Block):
            m.compile()


def parallelize(model: nn.Module, dims, cfg) -> nn.Module:
    """Apply TP/SP -> Ulysses -> memory policy -> compile -> FSDP2 to ``model`` (in place)."""
    if dims.pp > 1:
        raise NotImplementedError(
            f"parallel.pp={dims.pp}: pipeline stages are not split yet (a separate step before "
            f"parallelize); set parallel.pp=1.")
    model = apply_tensor_parallel(model, dims)
    model = apply_ulysses(model, dims)
    model = _apply_memory_policy(model, cfg)
    if cfg.schedule.compile:
        _compile_blocks(model)
    if uses_fsdp(dims):
        model = apply_fsdp(model, dims, cfg)
    elif dims.tp > 1:
        replicate_partial_grads(model)
    return model
