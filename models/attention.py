"""The attention backend interface: one small module every model calls for softmax attention.

Owns: ``CoreAttention`` (q, k, v -> output, causal, optionally block-diagonal per document) and
the choice of kernel behind it. Tensors are sequence-major, ``[batch, seq, heads, head_dim]``,
because that is the layout Ulysses' all-to-all scatters heads and gathers sequence in; keys and
values may carry fewer heads than queries (grouped-query attention).

Backends:
- ``sdpa`` (PyTorch scaled_dot_product_attention; ``sdpa_cudnn`` / ``sdpa_flash`` / ``sdpa_math``
  pin one of its kernels) for plain causal attention, and -- on CPU -- with a dense document mask;
- ``flex`` (FlexAttention with a block mask built from ``doc_ids``) for packed documents;
- ``flash_attn`` (the optional flash-attn package's varlen kernel) when installed.
``auto`` takes the fastest measured on Hopper for each case (see ``select_backend``): cuDNN SDPA
for plain causal, FlexAttention for document masks. Parallelism wraps this module from outside
(``longtrain.parallel.ulysses``); the model never knows.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "sdpa_cudnn", "sdpa_flash", "sdpa_math", "flex", "flash_attn")


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def select_backend(requested: str, device: torch.device, has_docs: bool) -> str:
    """The kernel for one call. Measured on H200 (docs/performance.md): cuDNN SDPA 567 TFLOP/s
    causal fwd+bwd, FlexAttention 419, flash SDPA 324 -- so cuDNN for plain causal, Flex for
    document masks (cuDNN SDPA takes no block-sparse mask)."""
    if requested not in BACKENDS:
        raise ValueError(f"model.attn_backend={requested!r} is unknown; choose one of {list(BACKENDS)}.")
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return "sdpa"  # dense mask on CPU; FlexAttention's CPU path is for compiled use only
    if has_docs:
        return "flex"
    return "sdpa_cudnn"


def selective_recompute_supported(requested: str, device_type: str, has_docs: bool) -> bool:
    """Whether selective recomputation (``memory/selective.py``, a Python dispatch mode around each
    block) can run around this attention. Compiled FlexAttention -- document masks on a GPU --
    cannot: dynamo refuses to trace into an active dispatch mode (torch 2.11 on an H200,
    ``Unsupported: Attempted to inline function marked as skipped``)."""
    return not (device_type == "cuda" and select_backend(requested, torch.device(device_type), has_docs) == "flex")


def describe_backends(requested: str, device: torch.device) -> str:
    """One line for the start-up log: which kernel each case will use."""
    plain = select_backend(requested, device, has_docs=False)
    docs = select_backend(requested, device, has_docs=True)
    how = "auto-selected" if requested == "auto" else "set by model.attn_backend"
    return f"attention: plain causal -> {plain}, document masks -> {docs} ({how})"


_SDPA_KERNEL = {
    "sdpa_cudnn": "CUDNN_ATTENTION",
    "sdpa_flash": "FLASH_ATTENTION",
    "sdpa_math": "MATH",
}


def _sdpa_context(backend: str):
    if backend not in _SDPA_KERNEL:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, _SDPA_KERNEL[backend])])


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def document_block_mask(doc_ids: torch.Tensor, block: int = 128):
    """FlexAttention block mask: causal and within one document. doc_ids: [B, S].

    Built from per-block document ranges in O((S / block)^2) memory. ``create_block_mask`` would
    first materialise the whole S x S mask in eager mode (128 GiB at 128K tokens); its compiled
    form avoids that but cannot run inside the selective-recompute dispatch mode
    (memory/selective.py) where the first block builds the mask. A (query block, key block) pair
    is *partial* when their document-id ranges overlap (a superset of the pairs with any allowed
    entry, so the mask is exact: ``mask_mod`` decides inside partial blocks), *full* when both
    blocks lie in one and the same document and the key block is strictly earlier.
    """
    from torch.nn.attention.flex_attention import BlockMask

    B, S = doc_ids.shape
    n = -(-S // block)
    ids = doc_ids
    if n * block != S:  # a ragged last block: repeat its last id (only widens its range)
        ids = torch.cat([ids, ids[:, -1:].expand(B, n * block - S)], dim=1)
    ids = ids.view(B, n, block)
    lo, hi = ids.amin(-1), ids.amax(-1)  # [B, n]
    q_idx = torch.arange(n, device=doc_ids.device)
    causal = q_idx[:, None] >= q_idx[None, :]
    overlap = (lo[:, None, :] <= hi[:, :, None]) & (lo[:, :, None] <= hi[:, None, :])  # [B, q, kv]
    single = lo == hi
    full = (causal & (q_idx[:, None] != q_idx[None, :]))[None] & single[:, :, None] & single[:, None, :] & \
        (lo[:, :, None] == lo[:, None, :])
    partial = causal[None] & overlap & ~full

    def ordered(m: torch.Tensor):  # [B, q, kv] bool -> counts [B, 1, q], indices [B, 1, q, kv] (used ones first)
        counts = m.sum(-1, dtype=torch.int32)
        order = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return counts[:, None], order[:, None]

    def mask_mod(b, h, q, kv):
        return (q >= kv) & (doc_ids[b, q] == doc_ids[b, kv])

    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(S, S))


def dense_document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, S, S] mask (True = attend): causal and within one document."""
    S = doc_ids.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same & causal)[:, None]


class CoreAttention(torch.nn.Module):
    """softmax(q k^T / sqrt(d)) v, causal, optionally restricted to each token's document."""

    def __init__(self, backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"model.attn_backend={backend!r} is unknown; choose one of {list(BACKENDS)}.")
        self.backend = backend
        self._mask_cache: tuple = (None, None)

    def _cached(self, doc_ids: torch.Tensor, build):
        key, val = self._mask_cache
        if key is not None and key[0] is doc_ids and key[1] == build.__name__:
            return val
        val = build(doc_ids)
        self._mask_cache = ((doc_ids, build.__name__), val)
        return val

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        backend = select_backend(self.backend, q.device, doc_ids is not None)
        gqa = q.shape[2] != k.shape[2]
        if backend == "flash_attn":
            return self._flash_attn(q, k, v, doc_ids)
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
        if backend == "flex":
            flex = _compiled_flex() if q.is_cuda else None
            if flex is None:
                from torch.nn.attention.flex_attention import flex_attention as flex
            if doc_ids is None:  # plain causal: one document
                bm = document_block_mask(torch.zeros(1, q.shape[1], dtype=torch.int32, device=q.device))
            else:
                bm = self._cached(doc_ids, document_block_mask)
            out = flex(qt, kt, vt, block_mask=bm, enable_gqa=gqa)
        elif doc_ids is None:
            with _sdpa_context(backend):
                out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=gqa)
        else:
            mask = self._cached(doc_ids, dense_document_mask)
            with _sdpa_context(backend):
                out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=gqa)
        return out.transpose(1, 2)

    @staticmethod
    def _flash_attn(q, k, v, doc_ids):
        import flash_attn

        if doc_ids is None:
            return flash_attn.flash_attn_func(q, k, v, causal=True)
        B, S = doc_ids.shape
        # document starts -> cumulative lengths over the flattened batch
        flat = doc_ids + (torch.arange(B, device=doc_ids.device)[:, None] * (int(doc_ids.max()) + 1))
        flat = flat.reshape(-1)
        change = torch.ones_like(flat, dtype=torch.bool)
        change[1:] = flat[1:] != flat[:-1]
        starts = torch.nonzero(change).flatten()
        cu = torch.cat([starts, torch.tensor([flat.numel()], device=flat.device)]).to(torch.int32)
        max_len = int((cu[1:] - cu[:-1]).max())
        out = flash_attn.flash_attn_varlen_func(
            q.reshape(B * S, *q.shape[2:]), k.reshape(B * S, *k.shape[2:]), v.reshape(B * S, *v.shape[2:]),
            cu, cu, max_len, max_len, causal=True)
        return out.reshape(q.shape)
