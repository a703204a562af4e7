"""Document sources: where raw documents come from, and the in-memory document collections.

Owns:
- text streams for ``prepare``: plain text files (one file = one document), JSONL (one line = one
  document, ``text_field``), Parquet (one row = one document, ``text_column``) and the embedded
  default -- the Python standard library's own ``.py`` files, sorted, so every machine with the same
  Python gets the same corpus without a download. Text and JSONL may be compressed (``.gz``,
  ``.bz2``, ``.xz`` through Python's own modules; ``.zst`` through the ``zstandard`` package when
  it is installed); they must be UTF-8: a document with a byte that is not, or a NUL byte (a
  binary file), is named with its file and line and goes through the ``on_bad_document`` policy;
- ``Documents``: the small interface every reader implements (``lengths``, ``get(i)``,
  ``where(i)``), and its in-memory and synthetic implementations.

The idea: packing and sampling need only document lengths; tokens are fetched per document when a
sequence is built. So a reader only has to say how long each document is and fetch one on demand.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import json
import logging
import lzma
import os
import sysconfig
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import pyarrow.parquet as pq

from .tokenizer import Tokenizer, encode_document
from .validate import BadDocuments, DataError, check_tokens

log = logging.getLogger("longtrain.data")

# Folders of the standard library that are not representative source code, or are huge test data.
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "turtledemo", "__pycache__",
                "lib2to3", "ensurepip", "__phello__", "tkinter", "pydoc_data"}


# --------------------------------------------------------------------------------------------
# Documents: the reader interface
# --------------------------------------------------------------------------------------------


class Documents:
    """A random-access collection of token documents. Subclasses set ``lengths`` and ``get``."""

    lengths: np.ndarray  # int64 [n_docs]: tokens per document (0 = excluded, e.g. skipped)
    name: str = "documents"

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    def get(self, i: int) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def where(self, i: int) -> str:
        """Where document ``i`` comes from, for error messages (file and row)."""
        return f"{self.name} document {i}"

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())


class MemoryDocuments(Documents):
    """Documents held in one concatenated int32 array (fine for a few hundred MB)."""

    def __init__(self, docs: Sequence[np.ndarray], names: Optional[Sequence[str]] = None, name: str = "memory"):
        self.name = name
        self.lengths = np.array([len(d) for d in docs], dtype=np.int64)
        self.offsets = np.zeros(len(docs) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=self.offsets[1:])
        self.tokens = np.concatenate(docs).astype(np.int32, copy=False) if len(docs) else np.zeros(0, np.int32)
        self.names = list(names) if names is not None else None

    def get(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def where(self, i: int) -> str:
        return self.names[i] if self.names else f"{self.name} document {i}"


class SyntheticDocuments(Documents):
    """Random-token documents of random lengths; document ``i`` is a pure function of (seed, i).

    Lengths follow a log-normal around ``mean_len`` (clipped to [2, 64 * mean_len]) so packing sees
    a realistic spread of short and long documents; tokens are uniform in ``[0, vocab_size)``.
    Nothing is stored but the lengths, so it scales to any benchmark size.

    With ``period`` > 0 a document repeats its first ``period`` random tokens to its length: every
    token after the first period is the one ``period`` places back, so it can be predicted only
    through attention (a task a tiny model learns in a few hundred steps; the LR sweep's proxy).
    """

    def __init__(self, n_docs: int, mean_len: int, vocab_size: int, seed: int = 0, period: int = 0):
        self.name = "synthetic"
        self.seed, self.vocab_size, self.period = seed, vocab_size, period
        rng = np.random.default_rng([seed, 0x5EED])
        sigma = 1.0
        raw = rng.lognormal(np.log(mean_len) - sigma * sigma / 2, sigma, size=n_docs)
        self.lengths = np.clip(raw.round(), 2, 64 * mean_len).astype(np.int64)

    def get(self, i: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 1, int(i)])
        n = int(self.lengths[i])
        if self.period:
            return np.resize(rng.integers(0, self.vocab_size, size=min(self.period, n), dtype=np.int32), n)
        return rng.integers(0, self.vocab_size, size=n, dtype=np.int32)


# --------------------------------------------------------------------------------------------
# Text streams (for prepare, and the stdlib default)
# --------------------------------------------------------------------------------------------


def stdlib_files(max_bytes: Optional[int] = None) -> list[Path]:
    """The standard library's ``.py`` files, sorted by relative path, up to ``max_bytes`` in total."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP and not d.startswith("config-"))
        for f in sorted(filenames):
            p = Path(dirpath) / f
            if f.endswith(".py") and not f.startswith("test_") and p.stat().st_size > 0:
                files.append(p)
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    if max_bytes is None:
        return files
    out, total = [], 0
    for p in files:
        if total >= max_bytes:
            break
        out.append(p)
        total += p.stat().st_size
    return out


COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")


def detect_format(path: Path) -> str:
    """By the name's suffix, under a compression suffix: ``x.jsonl.gz`` is jsonl."""
    stem = path.with_suffix("") if path.suffix.lower() in COMPRESSED_SUFFIXES else path
    suf = stem.suffix.lower()
    if suf in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suf in (".parquet", ".pq"):
        return "parquet"
    return "text"


def open_bytes(path: Path):
    """The file opened for reading bytes, decompressed as its suffix says."""
    suffix = path.suffix.lower()
    if suffix == ".zst":
        try:  # optional: zstd is not in Python's standard library
            import zstandard
        except ImportError:
            raise DataError(f"{path} is zstd-compressed, which needs the zstandard package: pip install "
                            f"zstandard (or decompress it first: zstd -d {path.name}).") from None
        # its reader has no readline: buffering adds line iteration, like gzip's and bz2's readers
        return io.BufferedReader(zstandard.open(path, "rb"))
    return {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(suffix, open)(path, "rb")


def _decoded(raw: bytes, where: str, first_line: int, bad: BadDocuments) -> Optional[str]:
    """``raw`` as UTF-8 text, or None after reporting a binary or non-UTF-8 document to ``bad``."""
    nul = raw.find(b"\0")
    if nul >= 0:
        line = first_line + raw.count(b"\n", 0, nul)
        bad.bad("binary", f"{where}:{line}: a NUL byte, so this is not text (a binary or differently "
                          f"compressed file?); give text, JSONL or Parquet inputs.")
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw.count(b"\n", 0, e.start)
        bad.bad("encoding", f"{where}:{line}: byte 0x{raw[e.start]:02x} is not UTF-8; convert the file to UTF-8 "
                            f"(e.g. iconv -f latin1 -t utf-8).")
        return None


def expand_inputs(inputs: Sequence[str], max_stdlib_bytes: Optional[int] = None) -> list[Path]:
    """Files named on the command line: files as given, folders walked (sorted), ``stdlib`` expanded."""
    out: list[Path] = []
    for s in inputs:
        if s == "stdlib":
            out += stdlib_files(max_stdlib_bytes)
            continue
        p = Path(s)
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith("."))
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"input {s!r} does not exist; give files, folders, or 'stdlib'.")
    if not out:
        raise DataError(f"inputs {list(inputs)} hold no files; give files, folders, or 'stdlib'.")
    return out


def iter_texts(files: Sequence[Path], fmt: str = "auto", text_field: str = "text",
               text_column: str = "text", parquet_batch_rows: int = 1024,
               bad: Optional[BadDocuments] = None) -> Iterator[tuple[str, str]]:
    """Yield ``(where, text)`` per document, streaming: memory holds one line / one row batch.

    ``where`` names the file and line/row for error messages. A missing JSONL field or Parquet
    column raises a ``DataError`` naming the file, row and the fields that do exist. A document
    that is not UTF-8 text goes to ``bad`` (default: an error).
    """
    bad = bad if bad is not None else BadDocuments("error", fix="pass --on-bad-document skip")
    for path in files:
        kind = detect_format(path) if fmt == "auto" else fmt
        if kind == "text":
            with _reading(path) as f:
                text = _decoded(f.read(), str(path), 1, bad)
            if text is not None:
                yield str(path), text
        elif kind == "jsonl":
            with _reading(path) as f:
                for lineno, raw in enumerate(f, 1):
                    where = f"{path}:{lineno}"
                    line = _decoded(raw, str(path), lineno, bad)
                    if line is None or not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{where}: not valid JSON ({e}); each line of a JSONL file must be "
                                        f"one JSON object.") from None
                    if not isinstance(obj, dict) or text_field not in obj:
                        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                        raise DataError(f"{where}: no text field {text_field!r} (fields: {keys}); pass "
                                        f"--text-field with the name of the field that holds the text.")
                    text = obj[text_field]
                    if not isinstance(text, str):
                        raise DataError(f"{where}: field {text_field!r} is a {type(text).__name__}, not a "
                                        f"string; pass --text-field naming a text field.")
                    yield where, text
        elif kind == "parquet":
            if path.suffix.lower() in COMPRESSED_SUFFIXES:
                raise DataError(f"{path}: a compressed Parquet file; Parquet compresses its own columns, so "
                                f"decompress it ({path.with_suffix('').name}) and give that.")
            try:
                pf = pq.ParquetFile(path)
            except Exception as e:
                raise DataError(f"{path}: not a readable Parquet file ({e}).") from None
            names = pf.schema_arrow.names
            if text_column not in names:
                raise DataError(f"{path}: no text column {text_column!r} (columns: {names}); pass "
                                f"--text-column with the name of the column that holds the text.")
            row = 0
            for batch in pf.iter_batches(batch_size=parquet_batch_rows, columns=[text_column]):
                for text in batch.column(0).to_pylist():
                    yield f"{path} row {row}", text if text is not None else ""
                    row += 1
        else:
            raise DataError(f"unknown input format {kind!r}; choose auto, text, jsonl or parquet.")


@contextlib.contextmanager
def _reading(path: Path):
    """``open_bytes(path)``; a damaged compressed stream becomes a DataError naming the file."""
    try:
        with open_bytes(path) as f:
            yield f
    except (EOFError, OSError, lzma.LZMAError) as e:  # gzip.BadGzipFile is an OSError
        if path.suffix.lower() not in COMPRESSED_SUFFIXES:
            raise
        raise DataError(f"{path}: cannot be decompressed as {path.suffix} ({type(e).__name__}: {e}); the file is "
                        f"damaged or not compressed as its name says.") from None
    except Exception as e:  # zstandard.ZstdError: not an OSError
        if path.suffix.lower() != ".zst" or type(e).__module__.split(".")[0] != "zstandard":
            raise
        raise DataError(f"{path}: cannot be decompressed as .zst ({e}); the file is damaged.") from None


def tokenize_texts(tok: Tokenizer, texts: Sequence[tuple[str, str]], bad: BadDocuments,
                   vocab_size: Optional[int] = None) -> tuple[list[np.ndarray], list[str]]:
    """Encode ``(where, text)`` pairs as documents; empty or out-of-vocab ones go through ``bad``."""
    vocab_size = vocab_size or tok.vocab_size
    keep = [(w, t) for w, t in texts if t.strip() or bad.bad("empty", f"{w}: empty document (no text).")]
    ids = tok.encode_batch([t for _, t in keep])
    docs, names = [], []
    for (w, _), x in zip(keep, ids):
        doc = encode_document(tok, x)
        msg = check_tokens(doc, vocab_size, w)
        if msg:
            bad.bad("vocab", msg)
            continue
        docs.append(doc)
        names.append(w)
    return docs, names


_STDLIB_CACHE: dict[tuple, MemoryDocuments] = {}


def stdlib_documents(tok: Tokenizer, max_bytes: int = 4 << 20) -> MemoryDocuments:
    """The embedded default corpus, tokenized once per process and cached (a few MB)."""
    key = (tok.fingerprint(), max_bytes)
    if key not in _STDLIB_CACHE:
        files = stdlib_files(max_bytes)
        skip = BadDocuments("skip", max_logged=0)
        texts = list(iter_texts(files, "text", bad=skip))
        docs, names = tokenize_texts(tok, texts, skip)
        _STDLIB_CACHE[key] = MemoryDocuments(docs, names, name="stdlib")
        log.info("stdlib corpus: %d files, %d tokens", len(docs), _STDLIB_CACHE[key].n_tokens)
    return _STDLIB_CACHE[key]
