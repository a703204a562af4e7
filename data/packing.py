"""Document packing: many documents of very different lengths -> fixed-length training sequences.

Owns: ``plan_packing`` (which pieces of which documents go into which sequence, computed from
lengths alone), ``build_sequence`` (the tokens/labels/positions/doc ids of one sequence, or of one
slice of it), and ``pack_documents`` (both in one call, for small in-memory corpora and tests).

The idea. A sequence holds ``seq_len + 1`` token slots so that the labels are the shifted tokens.
Every document piece in a sequence is its own attention block: ``doc_ids`` number the pieces
0, 1, 2, ... within the sequence (padding gets the next id), ``position_ids`` restart at 0 for each
piece, and a label is -100 wherever the next slot belongs to another piece or to padding. The
attention mask a backend builds from this is block-diagonal causal::

    mask[q, kv] = (doc_ids[q] == doc_ids[kv]) & (q >= kv)

which is exactly what FlexAttention's ``mask_mod`` takes; ``cu_seqlens_from_doc_ids`` gives the
varlen (flash-attn) form of the same blocks.

Methods: ``greedy`` is next-fit -- documents in the given order; one that does not fit in what is
left of the current sequence closes it (the rest is padding). ``best_fit`` is best-fit decreasing
within the window: the longest pieces first, each into the open sequence it fills most tightly,
which leaves far less padding. Documents longer than a sequence follow ``split_long``: ``split``
cuts them into pieces that continue in the next sequence (consecutive pieces overlap by one token,
so the token that was only a label at the end of one sequence is an input in the next and no
prediction is lost), ``truncate`` keeps the first ``seq_len + 1`` tokens, ``drop`` skips them.
Packing is a pure function of its inputs (no randomness), so a packed order is reproducible.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

IGNORE_INDEX = -100


@dataclass
class PackPlan:
    """Sequences as lists of document pieces: sequence ``s`` holds pieces ``seq_ptr[s]:seq_ptr[s+1]``;
    piece ``j`` is ``doc[seg_doc[j]][seg_start[j] : seg_start[j] + seg_len[j]]``, laid out in order
    from slot 0 of the sequence."""

    seq_ptr: np.ndarray
    seg_doc: np.ndarray
    seg_start: np.ndarray
    seg_len: np.ndarray
    capacity: int
    dropped: int = 0  # documents dropped (split_long=drop, or shorter than 2 tokens)

    @property
    def n_sequences(self) -> int:
        return int(self.seq_ptr.shape[0] - 1)

    def segments(self, s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, b = self.seq_ptr[s], self.seq_ptr[s + 1]
        return self.seg_doc[a:b], self.seg_start[a:b], self.seg_len[a:b]

    def fill(self) -> float:
        """Fraction of token slots holding document tokens (1.0 = no padding)."""
        return float(self.seg_len.sum()) / max(1, self.n_sequences * self.capacity)

    def reorder(self, order: np.ndarray) -> "PackPlan":
        """The same sequences in another order (``order[i]`` = old index of new sequence ``i``)."""
        counts = np.diff(self.seq_ptr)[order]
        ptr = np.zeros(len(order) + 1, np.int64)
        np.cumsum(counts, out=ptr[1:])
        idx = np.concatenate([np.arange(self.seq_ptr[o], self.seq_ptr[o + 1]) for o in order]) \
            if len(order) else np.zeros(0, np.int64)
        return PackPlan(ptr, self.seg_doc[idx], self.seg_start[idx], self.seg_len[idx], self.capacity, self.dropped)


class _Builder:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.ptr, self.doc, self.start, self.len = [0], [], [], []
        self.used = 0

    def add(self, d: int, start: int, n: int) -> None:
        self.doc.append(d)
        self.start.append(start)
        self.len.append(n)
        self.used += n

    def close(self) -> None:
        if self.used:
            self.ptr.append(len(self.doc))
            self.used = 0

    def plan(self, dropped: int) -> PackPlan:
        self.close()
        return PackPlan(np.asarray(self.ptr, np.int64), np.asarray(self.doc, np.int64),
                        np.asarray(self.start, np.int64), np.asarray(self.len, np.int64),
                        self.capacity, dropped)


def _long_chunks(length: int, capacity: int) -> list[tuple[int, int]]:
    """``split`` pieces of a long document: (start, length), consecutive pieces overlap by one."""
    out, start = [], 0
    while length - start >= 2:
        n = min(capacity, length - start)
        out.append((start, n))
        if start + n >= length:
            break
        start += n - 1
    return out


def plan_packing(lengths: Sequence[int], doc_index: Optional[Sequence[int]] = None, *, seq_len: int,
                 method: str = "greedy", split_long: str = "split") -> PackPlan:
    """Pack documents with the given ``lengths`` (in this order) into sequences of ``seq_len + 1`` slots.

    ``doc_index[i]`` is the id recorded for document ``i`` (default ``i``). Documents shorter than
    two tokens carry no prediction and are dropped (counted in ``PackPlan.dropped``).
    """
    if method not in ("greedy", "best_fit"):
        raise ValueError(f"data.packing={method!r} is not allowed; choose 'greedy' or 'best_fit'.")
    if split_long not in ("split", "truncate", "drop"):
        raise ValueError(f"data.split_long={split_long!r} is not allowed; choose split, truncate or drop.")
    cap = seq_len + 1
    lengths = np.asarray(lengths, np.int64)
    ids = np.arange(len(lengths)) if doc_index is None else np.asarray(doc_index, np.int64)
    b = _Builder(cap)
    dropped = 0
    if method == "greedy":
        for d, n in zip(ids.tolist(), lengths.tolist()):
            if n < 2 or (n > cap and split_long == "drop"):
                dropped += 1
                continue
            if n > cap and split_long == "split":
                # A long document starts in what is left of the current sequence and continues.
                start = 0
                while n - start >= 2:
                    if cap - b.used < 2:
                        b.close()
                    take = min(cap - b.used, n - start)
                    b.add(d, start, take)
                    if start + take >= n:
                        break
                    b.close()
                    start += take - 1
                continue
            n = min(n, cap)  # truncate
            if b.used + n > cap:
                b.close()
            b.add(d, 0, n)
        return b.plan(dropped)

    # best_fit: full chunks of long documents are whole sequences; the rest is bin-packed.
    items: list[tuple[int, int, int]] = []  # (doc, start, length)
    for d, n in zip(ids.tolist(), lengths.tolist()):
        if n < 2 or (n > cap and split_long == "drop"):
            dropped += 1
            continue
        if n > cap and split_long == "split":
            for start, m in _long_chunks(n, cap):
                if m == cap:
                    b.add(d, start, m)
                    b.close()
                else:
                    items.append((d, start, m))
            continue
        items.append((d, 0, min(n, cap)))
    order = sorted(range(len(items)), key=lambda i: (-items[i][2], i))
    bins: list[list[tuple[int, int, int]]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining slots, bin index) of open bins
    for i in order:
        d, start, m = items[i]
        k = bisect.bisect_left(free, (m, -1))
        if k < len(free):
            rem, bi = free.pop(k)
        else:
            rem, bi = cap, len(bins)
            bins.append([])
        bins[bi].append((d, start, m))
        if rem - m >= 2:  # a bin with < 2 free slots can take no document
            bisect.insort(free, (rem - m, bi))
    for pieces in bins:
        for d, start, m in pieces:
            b.add(d, start, m)
        b.close()
    return b.plan(dropped)


def build_sequence(doc: np.ndarray, start: np.ndarray, length: np.ndarray,
                   fetch: Callable[[int], Optional[np.ndarray]], *, seq_len: int, pad_id: int,
                   doc_masking: bool = True, lo: int = 0, hi: Optional[int] = None) -> dict[str, np.ndarray]:
    """Tokens, labels, positions (and doc ids) of input positions ``[lo, hi)`` of one packed sequence.

    Only the pieces overlapping slots ``[lo, hi]`` are fetched (slot ``hi`` is the last label), so
    each sequence-parallel rank reads just its slice of a million-token sequence. ``fetch(d)``
    returns document ``d``'s tokens, or None for a document to mask out (a skipped bad document:
    its slots become padding with -100 labels).
    """
    hi = seq_len if hi is None else hi
    n = hi - lo + 1
    tok = np.full(n, pad_id, np.int64)
    seg = np.full(n, len(doc), np.int32)  # padding: its own id after the last piece
    pos = np.zeros(n, np.int64)
    valid = np.zeros(n, bool)
    p = 0
    for j in range(len(doc)):
        m = int(length[j])
        a, b = max(p, lo), min(p + m, hi + 1)
        if a < b:
            seg[a - lo:b - lo] = j
            pos[a - lo:b - lo] = np.arange(a - p, b - p)
            data = fetch(int(doc[j]))
            if data is not None:
                s0 = int(start[j])
                tok[a - lo:b - lo] = data[s0 + a - p:s0 + b - p]
                valid[a - lo:b - lo] = True
        p += m
        if p > hi:
            break
    if doc_masking:
        same = (seg[1:] == seg[:-1]) & valid[1:] & valid[:-1]
        return {"tokens": tok[:-1], "labels": np.where(same, tok[1:], IGNORE_INDEX),
                "position_ids": pos[:-1], "doc_ids": seg[:-1]}
    return {"tokens": tok[:-1], "labels": np.where(valid[1:], tok[1:], IGNORE_INDEX),
            "position_ids": np.arange(lo, hi, dtype=np.int64)}


def cu_seqlens_from_doc_ids(doc_ids: np.ndarray) -> np.ndarray:
    """Cumulative block lengths ``[0, l0, l0+l1, ..., S]`` of a 1-D ``doc_ids`` (varlen attention form)."""
    doc_ids = np.asarray(doc_ids)
    cut = np.flatnonzero(doc_ids[1:] != doc_ids[:-1]) + 1
    return np.concatenate([[0], cut, [len(doc_ids)]]).astype(np.int32)


def pack_documents(docs: Sequence[np.ndarray], *, seq_len: int, method: str = "greedy",
                   split_long: str = "split", pad_id: int = 0, doc_masking: bool = True) -> list[dict]:
    """Pack in-memory documents (in the given order) into sequences.

    Returns one dict per sequence with numpy ``tokens``, ``labels``, ``position_ids``, ``doc_ids``
    (each ``[seq_len]``) and ``cu_seqlens``. Large corpora use ``plan_packing`` per window of
    documents instead (see ``data.sampler``), which never holds more than lengths in memory.
    """
    plan = plan_packing([len(d) for d in docs], seq_len=seq_len, method=method, split_long=split_long)
    out = []
    for s in range(plan.n_sequences):
        seq = build_sequence(*plan.segments(s), lambda d: docs[d], seq_len=seq_len, pad_id=pad_id,
                             doc_masking=doc_masking)
        if doc_masking:
            seq["cu_seqlens"] = cu_seqlens_from_doc_ids(seq["doc_ids"])
        out.append(seq)
    return out
