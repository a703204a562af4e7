"""Activation recomputation: which transformer blocks keep their internals, and which recompute.

Owns: the per-block recompute modes (``none`` / ``full`` / ``selective``), their assignment to
layer groups (``memory.recompute_layers``), per-iteration checkpointing of a looped model's core
(``memory.recompute_loops``), and the thread-local "inside a checkpointed region" depth that the
activation offload reads so it never pushes its hooks under a checkpoint's own.

The idea: a block wrapped with ``torch.utils.checkpoint`` (non-reentrant) stores only its
inputs; backward re-runs the block to rebuild what it needs. ``selective`` additionally keeps the
outputs of the ops that are expensive to recompute but cheap to store -- attention (SDPA,
FlexAttention, flash-attn: O(S^2) FLOPs, O(S) output) and optionally matmuls -- through
``memory.selective``, which can keep them in host memory. Wrapping replaces the instance's ``forward`` rather
than inserting a wrapper module, so parameter names (and checkpoints) do not change, and hooks
installed on the module by tensor parallelism, Ulysses or FSDP2 keep running around it.

The blocks, their global indices and names come from the model (``model.blocks()``), as does the
module run once per loop iteration (``model.loop_body()``). Looped models: the core tells its
blocks' LoRA hooks which iteration runs, so a block of the core (``BlockRef.in_loop``) that is
recomputed in backward must see the iteration it ran in, not the last one; wrappers take
``model.snapshot_loop_index()`` at forward time and call it before recomputing.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Callable, Iterable

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from longtrain.config import ConfigError, check_recompute_layers
from longtrain.memory.selective import selective_context_fn
from longtrain.models.units import DescribedModel

_state = threading.local()


def checkpoint_depth() -> int:
    """How many checkpointed regions (of this module) the current forward is inside."""
    return getattr(_state, "depth", 0)


@contextlib.contextmanager
def _inside_checkpoint():
    _state.depth = checkpoint_depth() + 1
    try:
        yield
    finally:
        _state.depth -= 1


def in_backward() -> bool:
    """True while autograd's engine runs (e.g. a checkpoint recomputing its forward)."""
    return torch._C._current_graph_task_id() != -1


# --------------------------------------------------------------------------------------------
# Wrapping
# --------------------------------------------------------------------------------------------


def checkpointed(fn: Callable, mode: str, selective_save: str = "attention",
                 snapshot: Callable | None = None, store=None) -> Callable:
    """``fn`` run under non-reentrant checkpoint (``full``/``selective``); ``none`` returns ``fn``.

    ``store``: where ``selective`` keeps the op outputs it saves (``memory.selective``; the
    activation offloader when offload is on, else the GPU)."""
    if mode == "none":
        return fn
    context_fn = selective_context_fn(selective_save, store) if mode == "selective" else None

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        restore = snapshot() if snapshot is not None else None

        def body(*a, **k):
            if restore is not None:
                restore()
            return fn(*a, **k)

        extra = {"context_fn": context_fn} if context_fn is not None else {}
        with _inside_checkpoint():
            return checkpoint(body, *args, use_reentrant=False, **extra, **kwargs)

    return run


def wrap_forward(module: nn.Module, make: Callable[[Callable], Callable], tag: str) -> None:
    """Replace ``module.forward`` by ``make(current_forward)`` once per ``tag``.

    The instance attribute shadows the class method, so ``module(...)`` (and every hook on the
    module) still goes through ``nn.Module.__call__``.
    """
    applied = module.__dict__.setdefault("_longtrain_memory", [])
    if tag in applied:
        return
    module.forward = make(module.forward)
    applied.append(tag)


def recompute_mode_of(index: int, name: str, default: str, groups: Iterable[tuple[str, str]]) -> str:
    """The mode of one block: the last matching ``recompute_layers`` entry, else ``default``."""
    mode = default
    for sel, m in groups:
        if sel[0].isdigit():
            lo, _, hi = sel.partition("-")
            if int(lo) <= index <= int(hi or lo):
                mode = m
        elif name == sel or name.startswith(sel + "."):
            mode = m
    return mode


def apply_recompute(model: DescribedModel, mem, offload_wrap: Callable | None = None,
                    store=None) -> dict[str, str]:
    """Wrap every block the model lists (and a looped model's loop body) per ``mem`` (a ``MemoryConfig``).

    ``offload_wrap(fn)`` (from ``longtrain.memory.offload``) is put around each checkpointed
    call so the checkpoint's saved inputs go to the host; ``store`` (the same offloader) takes
    the outputs ``selective`` keeps. Returns {block name: mode}.
    """
    groups = check_recompute_layers(mem.recompute_layers)
    if mem.recompute_loops and not model.is_looped():
        raise ConfigError("memory.recompute_loops=true needs a looped model (model.arch=looped); "
                          "use memory.recompute for a Llama model.")
    modes = {}
    for ref in model.blocks():
        mode = recompute_mode_of(ref.index, ref.name, mem.recompute, groups)
        modes[ref.name] = mode
        snapshot = model.snapshot_loop_index if ref.in_loop else None

        def make(fwd, mode=mode, snapshot=snapshot):
            fn = checkpointed(fwd, mode, mem.selective_save, snapshot, store)
            return offload_wrap(fn) if offload_wrap is not None else fn

        if mode != "none" or offload_wrap is not None:
            wrap_forward(ref.module, make, "recompute")
    body = model.loop_body()
    if mem.recompute_loops and body is not None:
        def make_body(fwd):
            fn = checkpointed(fwd, "full")
            return offload_wrap(fn) if offload_wrap is not None else fn

        wrap_forward(body, make_body, "recompute_loops")
        modes["core"] = "full (per iteration)"
    return modes
