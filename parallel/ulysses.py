"""Ulysses sequence parallelism: trade a sequence shard for a head shard around attention.

Owns: ``ulysses_all_to_all`` (the autograd all-to-all), ``UlyssesAttention`` (the wrapper that
replaces each ``Attention.core``), ``UlyssesGatedDelta`` (the same for a gated delta rule
layer's ``GatedDeltaCore``) and ``apply_ulysses(model, dims)``.

The idea (DeepSpeed-Ulysses): outside attention every op is token-wise, so each of the ``sp``
ranks keeps its contiguous chunk of S/sp tokens with all heads. Attention needs all tokens but
treats heads independently, so one all-to-all turns ``[B, S/sp, H, D]`` ("my tokens, all heads")
into ``[B, S, H/sp, D]`` ("all tokens, my heads"), the unchanged local attention runs, and the
inverse all-to-all brings the output back. The backward of an all-to-all is the inverse
all-to-all, so gradients for other ranks' keys and values travel home the same way.

Grouped-query attention: query head h uses key/value head h // (H / Hkv). Rank r receives query
heads [r H/sp, (r+1) H/sp); to hand it exactly the KV heads those need, KV heads are first
repeated (``repeat_interleave``) until their count is a multiple of sp -- only when sp does not
already divide them, e.g. sp=4 with 2 KV heads. Position ids are the caller's (global or
per-document), so rotary needs nothing here. Document ids are all-gathered once per forward
(shared by every layer's wrapper) so the inner attention masks over the whole sequence.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn

from longtrain.models.attention import CoreAttention
from longtrain.models.linear_attention import GatedDeltaCore


def _a2a(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    """Split ``x`` into ``sp`` chunks along ``scatter_dim``, send chunk j to rank j, and
    concatenate what arrives, in rank order, along ``gather_dim``."""
    sp = dist.get_world_size(group)
    chunks = x.chunk(sp, dim=scatter_dim)
    # all_to_all_single exchanges contiguous slices of dim 0: put the rank index there
    send = torch.stack(chunks, dim=0).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group):
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return _a2a(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        # the inverse exchange: scatter what was gathered, gather what was scattered
        return _a2a(grad.contiguous(), gather_dim, scatter_dim, ctx.group), None, None, None


def ulysses_all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    """Differentiable all-to-all; ``[B, S/sp, H, D]`` with (2, 1) -> ``[B, S, H/sp, D]``."""
    return _AllToAll.apply(x, scatter_dim, gather_dim, group)


class _DocIdsGather:
    """The whole sequence's document ids, gathered once per forward and shared by all layers.

    The cache is keyed on the identity of the local tensor (held, so its id cannot be reused)
    and its version counter (a loader refilling one buffer in place bumps it): every layer of
    one forward receives the same ``doc_ids`` object from the model.
    """

    def __init__(self, group):
        self.group = group
        self._key = None
        self._full = None

    @torch.no_grad()
    def __call__(self, doc_ids: torch.Tensor) -> torch.Tensor:
        key = (doc_ids, doc_ids._version)
        if self._key is None or self._key[0] is not doc_ids or self._key[1] != key[1]:
            parts = [torch.empty_like(doc_ids) for _ in range(dist.get_world_size(self.group))]
            dist.all_gather(parts, doc_ids.contiguous(), group=self.group)
            self._key, self._full = key, torch.cat(parts, dim=1)
        return self._full


class UlyssesAttention(nn.Module):
    """Drop-in for ``CoreAttention``: tokens sharded over sp outside, heads sharded inside."""

    def __init__(self, inner: CoreAttention, group, doc_gather: _DocIdsGather):
        super().__init__()
        self.inner = inner
        self.group = group
        self.sp = dist.get_world_size(group)
        self.doc_gather = doc_gather

    def forward(self, q, k, v, doc_ids=None):
        sp, n_q, n_kv = self.sp, q.shape[2], k.shape[2]
        if n_q % sp:
            raise ValueError(f"Ulysses: {n_q} local query heads are not divisible by parallel.sp={sp}.")
        if n_kv % sp:
            # repeat each KV head so the count is lcm(n_kv, sp): query head h keeps KV head
            # h // group after the split, and sp divides both counts (n_q is a multiple of it)
            rep = sp // math.gcd(n_kv, sp)
            k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        q, k, v = (ulysses_all_to_all(t, 2, 1, self.group) for t in (q, k, v))
        full_docs = self.doc_gather(doc_ids) if doc_ids is not None else None
        out = self.inner(q, k, v, full_docs)
        return ulysses_all_to_all(out, 1, 2, self.group)


class UlyssesGatedDelta(nn.Module):
    """Drop-in for ``GatedDeltaCore`` (linear attention's recurrence): the same trade as attention
    -- each rank runs whole sequences for H/sp of the heads -- with the per-head gates [B, S, H]
    exchanged alongside q, k, v (keys and values have one head per query head: no replication)."""

    def __init__(self, inner: GatedDeltaCore, group, doc_gather: _DocIdsGather):
        super().__init__()
        self.inner, self.group, self.doc_gather = inner, group, doc_gather
        self.sp = dist.get_world_size(group)

    def forward(self, q, k, v, g, beta, doc_ids=None):
        if q.shape[2] % self.sp:
            raise ValueError(f"Ulysses: {q.shape[2]} local heads are not divisible by parallel.sp={self.sp}.")
        q, k, v = (ulysses_all_to_all(t, 2, 1, self.group) for t in (q, k, v))
        g, beta = (ulysses_all_to_all(t.unsqueeze(-1), 2, 1, self.group).squeeze(-1) for t in (g, beta))
        full_docs = self.doc_gather(doc_ids) if doc_ids is not None else None
        return ulysses_all_to_all(self.inner(q, k, v, g, beta, full_docs), 1, 2, self.group)


_WRAPPERS = {CoreAttention: UlyssesAttention, GatedDeltaCore: UlyssesGatedDelta}


def apply_ulysses(model: nn.Module, dims) -> nn.Module:
    """Replace every ``CoreAttention`` in ``model`` by a ``UlyssesAttention`` over the sp group,
    and every ``GatedDeltaCore`` by a ``UlyssesGatedDelta``."""
    if dims.sp == 1:
        return model
    group = dims.get_group("sp")
    doc_gather = _DocIdsGather(group)
    targets = [(name, m) for name, m in model.named_modules() if type(m) in _WRAPPERS]
    if not targets:
        raise ValueError("apply_ulysses: the model has no CoreAttention module to wrap; models must "
                         "call attention through longtrain.models.attention.CoreAttention.")
    for name, core in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _WRAPPERS[type(core)](core, group, doc_gather))
    return model
