"""``parallelize(model, dims, cfg)``: every parallelism applied to a plain model, in one order.

Owns the order, which matters:

1. tensor / sequence parallel (DTensor plans on the full, unsharded linears)
2. Ulysses (wraps each ``Attention.core``; sees local q/k/v after the tp split)
3. activation memory policy (``longtrain.memory``: recompute / offload around the finished blocks)
4. ``torch.compile`` per block (after the wrappers it must trace, before FSDP's hooks)
5. FSDP2 (shards whatever parameters -- plain or DTensor -- the steps above left)

Works for ``Llama`` and ``Looped`` (its shared core is just more ``Block``s plus its LoRA). In a
single process nothing is distributed and only the memory policy (and compile) apply. Pipeline
stages are split off before this, as their own step (``parallel.pipeline``), which then calls
``parallelize`` on each stage model.
"""

from __future__ import annotations

import torch.nn as nn

from longtrain.memory import apply_activation_memory
from longtrain.models.llama import Block
from longtrain.parallel.fsdp import apply_fsdp, uses_fsdp
from longtrain.parallel.tensor_parallel import apply_tensor_parallel, align_grad_placements
from longtrain.parallel.ulysses import apply_ulysses


def _compile_blocks(model: nn.Module) -> None:
    """``torch.compile`` each transformer block in place (``nn.Module.compile`` keeps parameter
    names: no ``_orig_mod.`` prefix). The looped core's blocks are compiled one by one; their
    LoRA hooks read ``core.loop_index``, so expect one recompile per loop index."""
    for m in model.modules():
        if isinstance(m, Block):
            m.compile()


def parallelize(model: nn.Module, dims, cfg) -> nn.Module:
    """Apply TP/SP -> Ulysses -> memory policy -> compile -> FSDP2 to ``model`` (in place)."""
    # with parallel.pp > 1, ``model`` is one pipeline stage (parallel.pipeline.build_pipeline)
    model = apply_tensor_parallel(model, dims)
    model = apply_ulysses(model, dims)
    # in place; the summary is for the start-up log
    model._longtrain_memory_summary = apply_activation_memory(model, cfg)
    if cfg.schedule.compile:
        _compile_blocks(model)
    if uses_fsdp(dims):
        model = apply_fsdp(model, dims, cfg)
    elif dims.tp > 1:
        align_grad_placements(model)
    return model
