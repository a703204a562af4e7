"""The loader the trainer calls: ``build_loader(cfg, ...)`` -> micro-batches of this rank's slice.

Owns: opening the configured source (stdlib, synthetic, shards, megatron) as ``Documents``,
checking the tokenizer against the model's vocabulary, and ``Loader`` -- an endless iterator of
micro-batches with a global, topology-free resume state.

The batch contract (every value a torch tensor, ``S = data.seq_len``, ``sp = parallel.sp``):

- ``tokens``       int64 [B, S/sp]  this sp rank's contiguous slice of each packed sequence;
- ``labels``       int64 [B, S/sp]  next token, computed over the whole sequence before slicing
                                    (the last label of slice r is the first token of slice r+1);
                                    -100 across a document boundary and at padding;
- ``position_ids`` int64 [B, S/sp]  restarting at 0 for each document (``doc_masking``), or the
                                    global positions ``lo .. hi-1`` without it;
- ``doc_ids``      int32 [B, S/sp]  only with ``doc_masking``: the document's index within its
                                    sequence (padding has its own id); attention is allowed where
                                    ``doc_ids[q] == doc_ids[kv] and q >= kv``.

Which sequences: at step ``t`` data-parallel rank ``r`` reads global samples
``consumed + r*B + b`` (b < B), ``consumed = t * dp_size * B``; all sp ranks of one dp rank read
the same sequences. ``state_dict()`` is ``{"consumed_samples", "epoch", "epoch_start", ...}``:
global, so loading it on any dp size continues the same global sample order.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch

from .megatron import MegatronDocuments
from .packing import build_sequence
from .sampler import GlobalSampleOrder, split_documents
from .shards import ShardDocuments
from .sources import Documents, SyntheticDocuments, stdlib_documents
from .tokenizer import load_tokenizer
from .validate import BadDocuments, DataError, check_not_empty, check_vocab

log = logging.getLogger("longtrain.data")

STATE_VERSION = 1
_DOCS_CACHE: dict[tuple, tuple[Documents, int]] = {}


def open_documents(cfg, vocab_size: int, bad: Optional[BadDocuments] = None) -> tuple[Documents, int]:
    """The configured documents and the padding id (always < vocab_size). Cached per process,
    so the train and eval loaders share one reader."""
    key = (cfg.source, cfg.path, cfg.tokenizer, vocab_size, cfg.on_bad_document, cfg.seed,
           cfg.synthetic_docs, cfg.synthetic_doc_len, cfg.synthetic_period, cfg.stdlib_mb, cfg.verify_checksums)
    if key in _DOCS_CACHE:
        return _DOCS_CACHE[key]
    bad = bad or BadDocuments(cfg.on_bad_document)
    if cfg.source == "synthetic":
        docs, pad = SyntheticDocuments(cfg.synthetic_docs, cfg.synthetic_doc_len, vocab_size, cfg.seed,
                                       cfg.synthetic_period), 0
    elif cfg.source == "megatron":
        _need_path(cfg)
        docs = MegatronDocuments(cfg.path, vocab_size=vocab_size, bad=bad)
        pad = 0
    else:
        tok = load_tokenizer(cfg.tokenizer)
        check_vocab(tok.vocab_size, vocab_size, cfg.tokenizer)
        pad = next(i for i in (tok.pad_id, tok.eos_id, 0) if i is not None)
        if cfg.source == "stdlib":
            docs = stdlib_documents(tok, int(cfg.stdlib_mb * (1 << 20)))
        else:
            _need_path(cfg)
            docs = ShardDocuments(cfg.path, vocab_size=vocab_size, tokenizer=tok,
                                  verify=cfg.verify_checksums, bad=bad)
    check_not_empty(int((docs.lengths > 0).sum()), docs.n_tokens, f"data.source={cfg.source} {cfg.path}".strip())
    _DOCS_CACHE[key] = (docs, pad)
    return docs, pad


def _need_path(cfg) -> None:
    if not cfg.path:
        raise DataError(f"data.source={cfg.source} needs data.path (a prepared shard folder or a Megatron "
                        f"prefix); see `longtrain data prepare`.")


class Loader:
    """Endless micro-batches for one (dp_rank, sp_rank); resumable from a global sample count."""

    def __init__(self, docs: Documents, order: GlobalSampleOrder, *, batch_size: int, seq_len: int,
                 pad_id: int, doc_masking: bool, dp_rank: int = 0, dp_size: int = 1, sp_rank: int = 0,
                 sp_size: int = 1):
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size}).")
        if not 0 <= sp_rank < sp_size:
            raise DataError(f"sp_rank={sp_rank} must be in [0, sp_size={sp_size}).")
        if seq_len % sp_size:
            raise DataError(f"data.seq_len={seq_len} is not divisible by parallel.sp={sp_size}; each sequence-"
                            f"parallel rank needs an equal slice. Use a seq_len that is a multiple of {sp_size}.")
        self.docs, self.order = docs, order
        self.batch_size, self.seq_len, self.pad_id, self.doc_masking = batch_size, seq_len, pad_id, doc_masking
        self.dp_rank, self.dp_size, self.sp_rank, self.sp_size = dp_rank, dp_size, sp_rank, sp_size
        chunk = seq_len // sp_size
        self.lo, self.hi = sp_rank * chunk, (sp_rank + 1) * chunk
        self.consumed = 0  # global samples consumed by all dp ranks before the next micro-batch
        self.strict_resume = True  # data.on_order_change=error: refuse a state saved under other settings

    def __iter__(self) -> "Loader":
        return self

    def sample(self, g: int) -> dict[str, np.ndarray]:
        """This sp rank's slice of global sample ``g`` (numpy)."""
        _, segs = self.order.sample(g)
        return build_sequence(*segs, self.docs.get, seq_len=self.seq_len, pad_id=self.pad_id,
                              doc_masking=self.doc_masking, lo=self.lo, hi=self.hi)

    def __next__(self) -> dict[str, torch.Tensor]:
        base = self.consumed + self.dp_rank * self.batch_size
        rows = [self.sample(base + b) for b in range(self.batch_size)]
        self.consumed += self.dp_size * self.batch_size
        batch = {k: torch.from_numpy(rows[0][k][None] if len(rows) == 1 else np.stack([r[k] for r in rows]))
                 for k in rows[0]}
        if "doc_ids" in batch:
            batch["doc_ids"] = batch["doc_ids"].to(torch.int32)
        return batch

    @property
    def epoch(self) -> int:
        return self.order.position(self.consumed)["epoch"]

    @property
    def skipped(self) -> dict[str, int]:
        """Bad documents skipped so far under data.on_bad_document=skip, by kind."""
        bad = getattr(self.docs, "bad", None)
        return dict(bad.skipped) if bad else {}

    def state_dict(self) -> dict:
        """Global resume point: samples consumed by all ranks, the epoch holding the next one and
        the global index where that epoch started, plus what the order depends on."""
        pos = self.order.position(self.consumed)
        return {"version": STATE_VERSION, "consumed_samples": self.consumed, "epoch": pos["epoch"],
                "epoch_start": pos["epoch_start"], "order": self.order.fingerprint()}

    def load_state_dict(self, state: dict, strict: Optional[bool] = None) -> None:
        """Continue after ``state["consumed_samples"]`` global samples (any dp size).

        ``strict`` refuses a state whose order depends on other settings (seed, seq_len, packing,
        dataset); with ``strict=False`` it only warns and continues at the same sample count in
        the new order. ``None`` takes ``data.on_order_change`` (``self.strict_resume``).
        """
        strict = self.strict_resume if strict is None else strict
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data loader state version {state.get('version')!r} is not {STATE_VERSION}; "
                            f"this checkpoint was written by another longtrain version.")
        mine, theirs = self.order.fingerprint(), state.get("order", {})
        diff = sorted(k for k in set(mine) | set(theirs) if theirs.get(k) != mine.get(k))
        if diff:
            msg = ("the data loader state was saved with other settings: " +
                   ", ".join(f"{k}={theirs.get(k)!r} (now {mine.get(k)!r})" for k in diff) +
                   "; the global sample order differs, so the run cannot continue on the exact next sample.")
            if strict:
                raise DataError(msg + " Restore the old data settings, or set data.on_order_change=continue to "
                                      "continue at the same sample count in the new order (as when extending "
                                      "the context to a longer seq_len).")
            log.warning(msg)
            self.consumed = int(state["consumed_samples"])
            return
        self.consumed = int(state["consumed_samples"])
        self.order.restore(int(state["epoch"]), int(state["epoch_start"]))


def build_loader(cfg, *, vocab_size: int, dp_rank: int = 0, dp_size: int = 1, sp_rank: int = 0,
                 sp_size: int = 1, split: str = "train") -> Loader:
    """The loader for ``cfg`` (a ``DataConfig``) on this rank; see the module docstring for the batch."""
    if split not in ("train", "eval"):
        raise DataError(f"split={split!r} is not allowed; use 'train' or 'eval'.")
    docs, pad = open_documents(cfg, vocab_size)
    if pad >= vocab_size:
        pad = 0
    splits = split_documents(docs.lengths, cfg.eval_fraction)
    order = GlobalSampleOrder(docs.lengths, splits[split], seq_len=cfg.seq_len, method=cfg.packing,
                              split_long=cfg.split_long, seed=cfg.seed, split=split, window=cfg.pack_window,
                              length_weighting=cfg.length_weighting)
    loader = Loader(docs, order, batch_size=cfg.batch_size, seq_len=cfg.seq_len, pad_id=pad,
                    doc_masking=cfg.doc_masking, dp_rank=dp_rank, dp_size=dp_size, sp_rank=sp_rank,
                    sp_size=sp_size)
    loader.strict_resume = cfg.on_order_change == "error"
    return loader
