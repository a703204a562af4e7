"""Reading prepared token shards: documents fetched by row group, never a whole shard in RAM.

Owns: ``ShardDocuments`` -- the ``Documents`` view of a folder written by ``data.prepare``: it
checks the manifest (complete, same tokenizer, vocabulary fits the model), every shard (present,
right size, sha256 when ``verify``), reads only the small ``length`` column up front, and fetches
a document by reading its row group from a memory-mapped file into a small LRU cache.

The idea: packing needs lengths, which are a few bytes per document; tokens are read when a
sequence is built, one row group at a time, and each row group is checked once for empty
documents and token ids outside the vocabulary when it is first read.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow.parquet as pq

from .prepare import MANIFEST, read_manifest
from .sources import Documents
from .validate import BadDocuments, DataError, check_tokenizer_matches, check_vocab, verify_shard_file

log = logging.getLogger("longtrain.data")


def _open_parquet(path: Path):
    try:
        return pq.ParquetFile(path, memory_map=True)
    except Exception as e:
        raise DataError(f"shard {path} is not a readable Parquet file ({type(e).__name__}: {e}); it is "
                        f"corrupt or truncated. Delete it and re-run `longtrain data prepare` to rebuild it.") from None


class ShardDocuments(Documents):
    """Documents of a prepared shard folder (``manifest.json`` + ``shard-*.parquet``)."""

    def __init__(self, path: str, *, vocab_size: int, tokenizer=None, verify: bool = True,
                 bad: Optional[BadDocuments] = None, cache_row_groups: int = 32):
        self.dir = Path(path)
        self.name = str(self.dir)
        self.vocab_size = vocab_size
        self.bad = bad or BadDocuments("error")
        mpath = self.dir / MANIFEST
        if not self.dir.is_dir() or not mpath.is_file():
            raise DataError(f"data.path={path!r} holds no {MANIFEST}; point it at a folder written by "
                            f"`longtrain data prepare` (or use data.source=megatron for .bin/.idx files).")
        self.manifest = read_manifest(self.dir)
        if not self.manifest.get("complete"):
            raise DataError(f"{mpath} records an unfinished `longtrain data prepare` "
                            f"({len(self.manifest['shards'])} shards so far); re-run the same prepare "
                            f"command to finish it.")
        if tokenizer is not None:
            check_tokenizer_matches(self.manifest, tokenizer, mpath)
        tinfo = self.manifest["tokenizer"]
        check_vocab(int(tinfo["vocab_size"]), vocab_size, tinfo.get("spec", "?"))
        self.pad_id = tinfo.get("pad_id")
        self.shards = self.manifest["shards"]
        if not self.shards:
            raise DataError(f"{mpath} lists no shards: the prepared dataset is empty. Check the inputs of "
                            f"`longtrain data prepare` (were all documents empty or skipped?).")
        self._files, self._rg_starts, lengths = [], [], []
        for e in self.shards:
            f = self.dir / e["file"]
            verify_shard_file(f, e, checksum=verify)
            pf = _open_parquet(f)
            md = pf.metadata
            if md.num_rows != e["docs"]:
                raise DataError(f"shard {f} has {md.num_rows} rows but the manifest records {e['docs']}; "
                                f"delete it and re-run `longtrain data prepare` to rebuild it.")
            starts = np.zeros(md.num_row_groups + 1, np.int64)
            np.cumsum([md.row_group(i).num_rows for i in range(md.num_row_groups)], out=starts[1:])
            self._files.append(pf)
            self._rg_starts.append(starts)
            try:
                n = pf.read(columns=["length"]).column(0).to_numpy().astype(np.int64)
            except Exception as ex:
                raise DataError(f"shard {f}: cannot read its 'length' column ({ex}); the file is corrupt. "
                                f"Delete it and re-run `longtrain data prepare`.") from None
            for r in np.flatnonzero(n == 0):
                self.bad.bad("empty", f"shard {f} row {int(r)}: empty document (0 tokens).")
            lengths.append(n)
        self.lengths = np.concatenate(lengths)
        self._doc_start = np.zeros(len(self.shards) + 1, np.int64)
        np.cumsum([len(x) for x in lengths], out=self._doc_start[1:])
        self._cache: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray, set]] = OrderedDict()
        self._cache_size = cache_row_groups

    def _locate(self, i: int) -> tuple[int, int]:
        s = int(np.searchsorted(self._doc_start, i, side="right") - 1)
        return s, int(i - self._doc_start[s])

    def where(self, i: int) -> str:
        s, r = self._locate(i)
        return f"shard {self.dir / self.shards[s]['file']} row {r}"

    def _row_group(self, s: int, g: int) -> tuple[np.ndarray, np.ndarray, set]:
        key = (s, g)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        f = self.dir / self.shards[s]["file"]
        try:
            col = self._files[s].read_row_group(g, columns=["tokens"]).column(0).combine_chunks()
        except Exception as e:
            raise DataError(f"shard {f} row group {g} cannot be read ({type(e).__name__}: {e}); the file is "
                            f"corrupt. Delete it and re-run `longtrain data prepare` to rebuild it.") from None
        offsets = col.offsets.to_numpy()
        values = col.values.to_numpy(zero_copy_only=False)
        bad_rows: set = set()
        if values.size and (values.max() >= self.vocab_size or values.min() < 0):
            row_of = np.searchsorted(offsets, np.flatnonzero((values >= self.vocab_size) | (values < 0)), "right") - 1
            for r in np.unique(row_of):
                row = int(self._rg_starts[s][g] + r)
                bad_tok = values[offsets[r]:offsets[r + 1]]
                bad_tok = int(bad_tok[(bad_tok >= self.vocab_size) | (bad_tok < 0)][0])
                self.bad.bad("vocab", f"shard {f} row {row}: token id {bad_tok} is outside the vocabulary "
                             f"[0, {self.vocab_size}) of model.vocab_size={self.vocab_size}. Raise "
                             f"model.vocab_size or re-prepare the data with the model's tokenizer.")
                bad_rows.add(int(r))
        hit = (offsets, values, bad_rows)
        self._cache[key] = hit
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return hit

    def get(self, i: int) -> Optional[np.ndarray]:
        """Document ``i``'s tokens, or None if it was skipped as bad (``on_bad_document=skip``)."""
        s, r = self._locate(i)
        starts = self._rg_starts[s]
        g = int(np.searchsorted(starts, r, side="right") - 1)
        offsets, values, bad_rows = self._row_group(s, g)
        k = r - int(starts[g])
        if k in bad_rows:
            return None
        doc = values[offsets[k]:offsets[k + 1]]
        if doc.size != self.lengths[i]:
            raise DataError(f"{self.where(i)}: {doc.size} tokens but its 'length' column says "
                            f"{int(self.lengths[i])}; the shard is corrupt. Re-run `longtrain data prepare`.")
        return doc
