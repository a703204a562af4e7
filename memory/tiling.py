"""Tiling: the MLP and the output projection + cross-entropy computed over sequence chunks.

Owns: ``tile_mlp`` (the ``feed_forward`` of each block ``model.blocks()`` lists, run chunk by chunk
along the sequence) and ``tile_loss`` (the model's ``loss_head()`` computing its summed
cross-entropy chunk by chunk), plus ``apply_tiling`` which installs both on a model from outside.

The idea (Arctic Long Sequence Training's TiledMLP / tiled loss): the MLP is position-wise and
the loss is a sum over tokens, so both can run on one slice of the sequence at a time. Each
chunk is a non-reentrant checkpoint: forward keeps only the chunk's input (a view of the full
input, so no extra memory) and drops its intermediates; backward recomputes one chunk's
intermediates, differentiates it and frees it before the next. Alive at any time: one chunk's
``[chunk, ffn_dim]`` intermediates instead of ``[seq, ffn_dim]``, and one chunk's
``[chunk, vocab]`` logits (and their fp32 copy and gradient) instead of ``[seq, vocab]``, which at
a 128K vocabulary is the largest tensor of the whole step. The chunks are cut with
``Tensor.split`` so their gradients are joined by one concatenation instead of one zero-filled
full-size gradient per chunk. Results are exact up to float summation order.

Parameters receive their gradients through ordinary autograd (no hand-written backward), so the
tiling composes with tensor-parallel hooks on the projections, FSDP2, LoRA hooks and an outer
block checkpoint; the loop index of a looped core is restored before a chunk is recomputed.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn as nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.tensor import DTensor, Replicate

from longtrain.memory.recompute import checkpointed, wrap_forward
from longtrain.models.units import DescribedModel


def tiled_mlp_forward(fwd: Callable, n_chunks: int, snapshot: Callable | None = None,
                      seq_dim: int = 1) -> Callable:
    """``fwd(x)`` evaluated on ``n_chunks`` slices of ``x`` along ``seq_dim``, recomputed in backward."""
    chunk_fn = checkpointed(_waited(fwd), "full", snapshot=snapshot)

    @functools.wraps(fwd)
    def run(x, *args, **kwargs):
        if args or kwargs:  # not the plain position-wise call this tiling is for
            return fwd(x, *args, **kwargs)
        seq = x.shape[seq_dim]
        if n_chunks <= 1 or seq < 2:
            return fwd(x)
        step = chunk_fn if torch.is_grad_enabled() else fwd
        k = _gathered_shards(x)
        if k > 1:
            return torch.cat([step(p) for p in _rank_major_chunks(x, k, n_chunks, seq_dim)], dim=seq_dim)
        size = math.ceil(seq / min(n_chunks, seq))
        pieces = x.split(size, dim=seq_dim)
        return torch.cat([step(p) for p in pieces], dim=seq_dim)

    return run


def _waited(fwd: Callable) -> Callable:
    """``fwd`` whose output, when it is the wrapper of a still-running collective (tensor
    parallelism's reduce-scatter after the MLP), is waited for inside the call. A recompute in
    backward runs the chunk again only for what it saved and drops the output: unwaited, each such
    collective would stay registered for the rest of the run (a leak per layer, chunk and step)."""
    @functools.wraps(fwd)
    def run(*args, **kwargs):
        out = fwd(*args, **kwargs)
        # any non-view op on the wrapper waits and stays differentiable (``wait()`` would not)
        return out.clone() if isinstance(out, AsyncCollectiveTensor) else out

    return run


def _gathered_shards(x) -> int:
    """k > 1 when ``x`` is a sequence that tensor parallelism gathered from k ranks' shards (a
    replicated DTensor on a 1-D mesh: ``parallel.tensor_parallel``'s plan gathers the MLP input and
    scatters the output projection's result back along the sequence)."""
    if isinstance(x, DTensor) and x.device_mesh.ndim == 1 and all(isinstance(p, Replicate) for p in x.placements):
        return x.device_mesh.size()
    return 1


def _rank_major_chunks(x, k: int, n_chunks: int, seq_dim: int) -> list:
    """Chunk i = piece i of every rank's shard, in rank order. The output projection scatters a
    chunk back by rank, so rank r receives its own piece i, and the pieces concatenate to its
    contiguous shard (plain contiguous chunks would hand it other ranks' tokens)."""
    local = x.shape[seq_dim] // k
    size = math.ceil(local / min(n_chunks, local))
    return [torch.cat([x.narrow(seq_dim, r * local + start, min(size, local - start)) for r in range(k)], dim=seq_dim)
            for start in range(0, local, size)]


def tiled_loss_forward(fwd: Callable, tokens_per_chunk: int) -> Callable:
    """An ``LMHead.forward(h, labels)`` that sums the chunk losses; logits are never full-size.

    Without labels (logits requested) the original forward runs unchanged.
    """
    chunk_fn = checkpointed(fwd, "full")

    @functools.wraps(fwd)
    def run(h, labels=None):
        if labels is None:
            return fwd(h)
        dim = h.shape[-1]
        hf = h.reshape(1, -1, dim)  # tokens of all sequences in a row: [1, B*S, dim]
        if hf.shape[1] <= tokens_per_chunk:
            return fwd(h, labels)
        # Tensor parallelism hands the head a 1/k sequence shard (k = tp) and its output projection
        # gathers the shards of whatever it is given, in rank order: the labels of chunk i are then
        # rank 0's chunk i, rank 1's chunk i, ... Rows of ``lf``: each rank's labels in the order of
        # its flattened shard; k = 1 (no shard) is one row.
        b, s = labels.shape[0], labels.shape[1]
        k = s // h.shape[1]
        lf = labels.reshape(b, k, s // k).transpose(0, 1).reshape(k, -1)
        step = chunk_fn if torch.is_grad_enabled() else fwd
        total, start = None, 0
        for hc in hf.split(tokens_per_chunk, dim=1):
            lc = lf[:, start:start + hc.shape[1]].reshape(1, -1)
            start += hc.shape[1]
            part = step(hc, lc)
            total = part if total is None else total + part
        return total

    return run


def tile_mlp(model: DescribedModel, n_chunks: int) -> int:
    """Tile the ``feed_forward`` of every block the model lists; returns how many were tiled."""
    n = 0
    for ref in model.blocks():
        snapshot = model.snapshot_loop_index if ref.in_loop else None
        wrap_forward(ref.module.feed_forward, lambda fwd, s=snapshot: tiled_mlp_forward(fwd, n_chunks, s),
                     "tiled_mlp")
        n += 1
    return n


def tile_loss(model: DescribedModel, tokens_per_chunk: int) -> bool:
    """Tile the model's loss head (``loss_head()``, an ``LMHead``: labels -> summed cross-entropy)."""
    head = model.loss_head()
    if head is None:  # a pipeline stage that does not hold the head
        return False
    wrap_forward(head, lambda fwd: tiled_loss_forward(fwd, tokens_per_chunk), "tiled_loss")
    return True


def apply_tiling(model: nn.Module, mem) -> dict:
    """Install tiled MLP / tiled loss per ``mem`` (a ``MemoryConfig``)."""
    out = {}
    if mem.tiled_mlp > 1:
        out["tiled_mlp"] = tile_mlp(model, mem.tiled_mlp)
    if mem.tiled_loss > 0:
        out["tiled_loss"] = tile_loss(model, mem.tiled_loss)
    return out
