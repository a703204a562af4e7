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

Looped models: ``LoopedCore.forward`` sets ``core.loop_index`` for the per-loop LoRA hooks, so a
block of the core that is recomputed in backward must see the iteration it ran in, not the last
one; wrappers capture ``loop_index`` at forward time and restore it before recomputing.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Callable, Iterable

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from longtrain.config import check_recompute_layers
from longtrain.memory.selective import selective_context_fn

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


def loop_index_keeper(core) -> Callable[[], Callable[[], None]]:
    """``snapshot()`` returns a function restoring ``core.loop_index`` as it is now (no-op if none)."""
    if core is None or not hasattr(core, "loop_index"):
        return lambda: (lambda: None)

    def snapshot():
        i = core.loop_index

        def restore():
            core.loop_index = i

        return restore

    return snapshot


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


def block_index_map(model: nn.Module) -> list[tuple[int, str, nn.Module]]:
    """(index, qualified name, block) for every transformer block, in the documented order."""
    from longtrain.models.llama import Block

    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, Block)]
    out = []
    if hasattr(model, "layers") and not hasattr(model, "core"):  # Llama: keys are global indices
        for name, m in blocks:
            key = name.split(".")[-1]
            out.append((int(key) if key.isdigit() else len(out), name, m))
        return out
    return [(i, name, m) for i, (name, m) in enumerate(blocks)]


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


def apply_recompute(model: nn.Module, mem, offload_wrap: Callable | None = None, store=None) -> dict[str, str]:
    """Wrap every block (and a looped model's core) per ``mem`` (a ``MemoryConfig``).

    ``offload_wrap(fn)`` (from ``longtrain.memory.offload``) is put around each checkpointed
    call so the checkpoint's saved inputs go to the host; ``store`` (the same offloader) takes
    the outputs ``selective`` keeps. Returns {block name: mode}.
    """
    groups = check_recompute_layers(mem.recompute_layers)
    core = getattr(model, "core", None)
    is_looped = core is not None and hasattr(core, "loop_index")
    keep = loop_index_keeper(core if is_looped else None)
    modes = {}
    for index, name, block in block_index_map(model):
        mode = recompute_mode_of(index, name, mem.recompute, groups)
        modes[name] = mode
        in_core = is_looped and name.startswith("core.")
        snapshot = keep if in_core else None

        def make(fwd, mode=mode, snapshot=snapshot):
            fn = checkpointed(fwd, mode, mem.selective_save, snapshot, store)
            return offload_wrap(fn) if offload_wrap is not None else fn

        if mode != "none" or offload_wrap is not None:
            wrap_forward(block, make, "recompute")
    if is_looped and mem.recompute_loops:
        def make_core(fwd):
            fn = checkpointed(fwd, "full")
            return offload_wrap(fn) if offload_wrap is not None else fn

        wrap_forward(core, make_core, "recompute_loops")
        modes["core"] = "full (per iteration)"
    elif mem.recompute_loops and not is_looped:
        from longtrain.config import ConfigError

        raise ConfigError("memory.recompute_loops=true needs a looped model (model.arch=looped); "
                          "use memory.recompute for a Llama model.")
    return modes
