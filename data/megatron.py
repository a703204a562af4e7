"""Megatron-style indexed datasets (``prefix.bin`` + ``prefix.idx``) as longtrain ``Documents``.

Owns: ``MegatronDocuments``, which opens an existing preprocessed corpus through megatron-core's
own reader (``megatron.core.datasets.indexed_dataset.IndexedDataset``, memory-mapped) so corpora
made with Megatron's ``preprocess_data.py`` train here unchanged, and ``write_megatron`` (through
megatron-core's ``IndexedDatasetBuilder``) for tests and conversions.

The idea: a Megatron document is the run of sequences ``document_indices[d]:document_indices[d+1]``
(one sequence per document unless sentences were split); its tokens are read straight from the
memory map when a packed sequence needs them, and checked against the model's vocabulary then.
Megatron data carries no tokenizer record, so no tokenizer check is possible: the tokens are
taken as they are (EOD tokens included, as Megatron's preprocessing appends them).
"""

from __future__ import annotations

import os
import warnings
from typing import Optional, Sequence

import numpy as np
import torch

from .sources import Documents
from .validate import BadDocuments, DataError, check_tokens


def _indexed_dataset():
    try:  # megatron-core is optional (longtrain[megatron]): only data.source=megatron needs it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
    except ImportError as e:
        raise DataError(f"data.source=megatron needs megatron-core ({e}); install it with "
                        f"`pip install megatron-core` (or longtrain[megatron]).") from None
    return IndexedDataset, IndexedDatasetBuilder


class MegatronDocuments(Documents):
    """Documents of a Megatron ``.bin``/``.idx`` pair, read memory-mapped through megatron-core."""

    def __init__(self, prefix: str, *, vocab_size: int, bad: Optional[BadDocuments] = None):
        prefix = prefix[:-4] if prefix.endswith((".bin", ".idx")) else prefix
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                raise DataError(f"data.path={prefix!r}: {prefix + ext} is missing; data.source=megatron takes "
                                f"the common prefix of a .bin/.idx pair (e.g. /data/corpus_text_document).")
        IndexedDataset, _ = _indexed_dataset()
        try:
            self.ds = IndexedDataset(prefix, mmap=True)
        except Exception as e:
            raise DataError(f"data.path={prefix!r}: megatron-core cannot read this .bin/.idx pair "
                            f"({type(e).__name__}: {e}); it is corrupt or from an incompatible version.") from None
        self.name = prefix
        self.vocab_size = vocab_size
        self.bad = bad or BadDocuments("error")
        self.pad_id = 0
        self._doc_idx = np.asarray(self.ds.document_indices, np.int64)
        seq_lens = np.asarray(self.ds.sequence_lengths, np.int64)
        cum = np.concatenate([[0], np.cumsum(seq_lens)])
        self.lengths = cum[self._doc_idx[1:]] - cum[self._doc_idx[:-1]]
        expected = os.path.getsize(prefix + ".bin")
        itemsize = np.dtype(self.ds.index.dtype).itemsize
        if int(cum[-1]) * itemsize > expected:
            raise DataError(f"{prefix}.bin has {expected} bytes but its .idx describes {int(cum[-1]) * itemsize}; "
                            f"the .bin is truncated. Re-run Megatron's preprocessing for this corpus.")
        for d in np.flatnonzero(self.lengths == 0):
            self.bad.bad("empty", f"{prefix} document {int(d)}: empty document (0 tokens).")
        self._checked: dict[int, bool] = {}

    def where(self, i: int) -> str:
        return f"{self.name}.bin document {i}"

    def get(self, i: int) -> Optional[np.ndarray]:
        a, b = int(self._doc_idx[i]), int(self._doc_idx[i + 1])
        parts = [self.ds[j] for j in range(a, b)]
        doc = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if i not in self._checked:
            msg = check_tokens(doc, self.vocab_size, self.where(i))
            self._checked[i] = msg is None
            if msg:
                self.bad.bad("vocab", msg)
        return doc if self._checked[i] else None


def write_megatron(prefix: str, docs: Sequence[np.ndarray], dtype=np.int32) -> None:
    """Write documents as a Megatron ``.bin``/``.idx`` pair with megatron-core's own builder."""
    _, IndexedDatasetBuilder = _indexed_dataset()
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for d in docs:
        builder.add_item(torch.from_numpy(np.asarray(d, dtype=np.int64)))
        builder.end_document()
    builder.finalize(prefix + ".idx")
