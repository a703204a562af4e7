"""Validation of data on its way to the model: every bad input gets an error a user can act on.

Owns: ``DataError`` (a ``ValueError`` whose message names the file, the row, what is wrong and
what to do), ``BadDocuments`` (the ``data.on_bad_document`` policy: raise, or count and log a
skip), and the checks shared by the readers: empty documents, token ids outside the vocabulary,
shard checksums, tokenizer/manifest agreement, and non-empty datasets.

The idea: nothing silently wrong reaches the model. A reader that finds a problem either raises
(the default) or, under ``on_bad_document="skip"``, drops exactly that document, counts it and
logs the first few, so a run's log says how much data it did not train on.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Optional

import numpy as np

from longtrain.config import ConfigError

log = logging.getLogger("longtrain.data")


class DataError(ConfigError):
    """A user-facing problem with the training data; the message says what to change.

    A ``ConfigError`` (hence a ``ValueError`` and a ``UserError``), so the main CLI and the worker
    report it as the user-facing message it is, labelled a data error, not as a traceback."""

    kind = "data"


class BadDocuments:
    """Applies ``data.on_bad_document``: ``error`` raises, ``skip`` counts and logs (first 10)."""

    def __init__(self, policy: str = "error", max_logged: int = 10,
                 fix: str = "set data.on_bad_document=skip"):
        if policy not in ("error", "skip"):
            raise DataError(f"data.on_bad_document={policy!r} is not allowed; choose 'error' or 'skip'.")
        self.policy = policy
        self.fix = fix
        self.max_logged = max_logged
        self.skipped: dict[str, int] = {}

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def bad(self, kind: str, message: str) -> None:
        """Report one bad document: raise under ``error``; count and log under ``skip``."""
        if self.policy == "error":
            raise DataError(f"{message} To skip such documents instead, {self.fix}.")
        self.skipped[kind] = self.skipped.get(kind, 0) + 1
        if self.total_skipped <= self.max_logged:
            log.warning("skipping bad document (%s): %s", kind, message)


def check_tokens(ids: np.ndarray, vocab_size: int, where: str) -> Optional[str]:
    """A message if ``ids`` is empty or holds ids outside ``[0, vocab_size)``; None if fine."""
    if ids.size == 0:
        return f"{where}: empty document (0 tokens)."
    lo, hi = int(ids.min()), int(ids.max())
    if hi >= vocab_size or lo < 0:
        bad = hi if hi >= vocab_size else lo
        return (f"{where}: token id {bad} is outside the vocabulary [0, {vocab_size}); the data was "
                f"tokenized with a larger vocabulary than model.vocab_size={vocab_size}. Raise "
                f"model.vocab_size or re-prepare the data with the model's tokenizer.")
    return None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def verify_shard_file(path: Path, entry: dict, checksum: bool) -> None:
    """Existence, size and (optionally) sha256 of one shard against its manifest entry."""
    if not path.is_file():
        raise DataError(f"shard {path} is listed in {path.parent / 'manifest.json'} but missing; restore "
                        f"it, or re-run `longtrain data prepare` with the same arguments to rebuild it.")
    size = path.stat().st_size
    if "bytes" in entry and size != entry["bytes"]:
        raise DataError(f"shard {path} has {size} bytes but the manifest records {entry['bytes']}: the file "
                        f"is truncated or was replaced. Delete it and re-run `longtrain data prepare` "
                        f"(completed shards are kept) to rebuild it.")
    if checksum and entry.get("sha256"):
        got = sha256_file(path)
        if got != entry["sha256"]:
            raise DataError(f"shard {path} is corrupt: sha256 {got[:16]}... does not match the manifest's "
                            f"{entry['sha256'][:16]}.... Delete it and re-run `longtrain data prepare` "
                            f"to rebuild it.")


def check_tokenizer_matches(manifest: dict, tok, manifest_path: Path) -> None:
    """The configured tokenizer must be the one the shards were prepared with."""
    want = manifest.get("tokenizer", {})
    if want.get("fingerprint") != tok.fingerprint():
        raise DataError(f"data.tokenizer={tok.spec!r} (fingerprint {tok.fingerprint()}) does not match the "
                        f"tokenizer the shards in {manifest_path.parent} were prepared with "
                        f"(spec {want.get('spec')!r}, fingerprint {want.get('fingerprint')}; see "
                        f"{manifest_path}). Set data.tokenizer={want.get('spec')!r}, or re-prepare the "
                        f"data with the tokenizer you want.")


def check_vocab(tok_vocab: int, model_vocab: int, spec: str) -> None:
    if tok_vocab > model_vocab:
        raise DataError(f"data.tokenizer={spec!r} has {tok_vocab} tokens but model.vocab_size={model_vocab}; "
                        f"token ids would index past the embedding. Raise model.vocab_size to at least "
                        f"{tok_vocab} or use a smaller tokenizer.")


def check_not_empty(n_docs: int, n_tokens: int, what: str, hint: str = "") -> None:
    if n_docs == 0 or n_tokens == 0:
        raise DataError(f"{what} holds no usable documents ({n_docs} documents, {n_tokens} tokens)."
                        + (f" {hint}" if hint else " Point data.path at a prepared dataset with documents."))
