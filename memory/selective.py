"""Selective recomputation: which op outputs a checkpointed block keeps, and where they wait.

Owns: ``SavedOutputs`` (the pair of dispatch modes a checkpoint runs its forward and its
recomputation under) and ``selective_context_fn`` (the ``context_fn`` that ``recompute`` hands to
``torch.utils.checkpoint``).

The idea: a block under ``selective`` recomputation keeps the outputs of the ops that are
expensive to recompute but cheap to store -- attention (O(S^2) FLOPs, an O(S) output and its
log-sum-exp) and, per ``memory.selective_save``, matmuls -- and recomputes everything else. In
forward, a dispatch mode records the outputs of those ops in call order; when backward recomputes
the block, a second mode hands the recorded outputs back instead of running the ops again, so
attention's backward finds its output and log-sum-exp and attention never runs twice.

Why not ``torch.utils.checkpoint.create_selective_checkpoint_contexts``: it keeps the saved
outputs in GPU memory, in a store no hook can reach. At long sequences the kept attention outputs
are the largest thing a step holds (Llama-3-8B, 512K tokens on two GPUs: 2 GiB per layer), and
MEMO's way to train at a million tokens without recomputing attention is to move exactly those
to host memory, token-wise, overlapped with compute. Here the record of each saved output goes
through ``store`` -- the activation offloader's ``pack_output``/``unpack`` when ``memory.offload``
is on -- so what selective recomputation keeps is offloaded like the block inputs, in the same
pool, with the same token-wise fraction and prefetch.

Higher-order ops (FlexAttention) reach a Python dispatch mode only through a rule registered for
its class; ``_register_hops`` registers ours the way PyTorch registers its own SAC modes.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map


def attention_ops() -> list:
    """The attention kernels whose outputs selective recomputation keeps."""
    aten = torch.ops.aten
    names = ["_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
             "_scaled_dot_product_fused_attention_overrideable"]
    ops = [getattr(aten, n).default for n in names if hasattr(aten, n)]
    ops.append(torch.ops.higher_order.flex_attention)
    for name in ("_flash_attn_forward", "_flash_attn_varlen_forward"):
        # flash-attn >= 2.6 registers its kernels as torch custom ops; absent when not installed
        op = getattr(getattr(torch.ops, "flash_attn", None), name, None) if _has_flash_attn_ops() else None
        if op is not None:
            ops.append(op.default)
    return ops


@functools.lru_cache(maxsize=1)
def _has_flash_attn_ops() -> bool:
    try:
        torch.ops.flash_attn._flash_attn_forward  # noqa: B018 -- raises when flash-attn is absent
    except (AttributeError, RuntimeError):
        return False
    return True


def matmul_ops() -> list:
    aten = torch.ops.aten
    return [aten.mm.default, aten.addmm.default, aten.bmm.default]


def detached(t: torch.Tensor) -> torch.Tensor:
    """``t`` without autograd history, made below autograd (inside a dispatch mode).

    The recorded output object is the one autograd attaches the forward graph to; the
    recomputation must get a tensor of its own to attach its graph to, or the two graphs would
    share (and overwrite) one history. Re-enabling ADInplaceOrView makes ``detach`` a proper
    alias with its own version counter, as PyTorch's own selective checkpoint does.
    """
    with torch._C._SetExcludeDispatchKeyGuard(torch._C.DispatchKey.ADInplaceOrView, False):
        return t.detach()


class GPUStore:
    """Keeps saved outputs on the GPU: ``selective`` without offload. The store interface is
    ``keep(tensor) -> record`` in forward and ``take(record) -> tensor`` in the recomputation."""

    @staticmethod
    def keep(t: torch.Tensor):
        return detached(t)

    @staticmethod
    def take(record) -> torch.Tensor:
        return record


GPU_STORE = GPUStore()


def _keep_all(store, out):
    return tree_map(lambda x: store.keep(x) if isinstance(x, torch.Tensor) else x, out)


def _take_all(store, rec):
    return tree_map(lambda x: store.take(x), rec)


class _Record(TorchDispatchMode):
    """Forward: run every op; keep the outputs of the chosen ones in ``saved`` (call order)."""

    def __init__(self, chooser: Callable, saved: list, store):
        super().__init__()
        self.chooser, self.saved, self.store = chooser, saved, store

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.chooser(func, is_recompute=False):
            self.saved.append(_keep_all(self.store, out))
        return out


class _Replay(TorchDispatchMode):
    """Recomputation: hand back the kept outputs of the chosen ops; run every other op."""

    def __init__(self, chooser: Callable, saved: list, store):
        super().__init__()
        self.chooser, self.saved, self.store = chooser, saved, store
        self.next = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.chooser(func, is_recompute=True):
            return func(*args, **(kwargs or {}))
        if self.next >= len(self.saved):
            raise RuntimeError(f"selective recomputation: {func} ran more often in the recomputation than in "
                               f"forward; the block's forward must not depend on state that changed since.")
        rec, self.saved[self.next] = self.saved[self.next], None
        self.next += 1
        return _take_all(self.store, rec)


@functools.lru_cache(maxsize=1)
def _register_hops() -> None:
    """Let FlexAttention (a higher-order op) dispatch into our two modes."""
    hop = torch.ops.higher_order.flex_attention
    for mode in (_Record, _Replay):
        hop.py_impl(mode)(lambda mode, *args, **kwargs: mode.__torch_dispatch__(hop, [], args, kwargs))


def selective_context_fn(save: str = "attention", store=None) -> Callable:
    """A ``context_fn`` for ``torch.utils.checkpoint``: keep attention outputs (and matmul
    outputs per ``save``) through ``store`` (GPU memory when None), recompute the rest.

    ``attention+half_mm`` keeps every other matmul output (torchtitan's op-level policy): the
    counters are per checkpoint call and separate for forward and recomputation so both make the
    same decisions.
    """
    _register_hops()
    attn = set(attention_ops())
    mms = set(matmul_ops())
    store = GPU_STORE if store is None else store

    def context_fn():
        counts = {False: 0, True: 0}

        def chooser(func, is_recompute: bool) -> bool:
            if func in attn:
                return True
            if func in mms and save != "attention":
                if save == "attention+mm":
                    return True
                counts[is_recompute] += 1
                return counts[is_recompute] % 2 == 1
            return False

        saved: list = []
        return _Record(chooser, saved, store), _Replay(chooser, saved, store)

    return context_fn
