"""Tokenizers: text -> token ids, with a stable fingerprint recorded in every shard manifest.

Owns: ``ByteTokenizer`` (the embedded default; needs no download), ``HFTokenizer`` (any local
Hugging Face ``tokenizer.json`` through the ``tokenizers`` package) and ``load_tokenizer(spec)``.

The idea: a shard of token ids is only meaningful together with the tokenizer that produced it,
so every tokenizer has a ``fingerprint()`` -- a hash of everything that changes the mapping from
text to ids -- and readers refuse shards whose manifest names another fingerprint.
Documents are encoded as ``[bos] + ids + [eos]`` where the tokenizer has those tokens: with
per-document positions and a block-diagonal mask, BOS gives every document the same first token
and EOS teaches the model where a document ends.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .validate import DataError


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are bytes, 256 = BOS, 257 = EOS, 258 = PAD."""

    name = "byte"
    spec = "byte"
    vocab_size = 259
    bos_id: Optional[int] = 256
    eos_id: Optional[int] = 257
    pad_id: Optional[int] = 258

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` without special tokens (int32)."""
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return "byte-v1-259"


class HFTokenizer:
    """A local Hugging Face ``tokenizer.json`` (fast tokenizer) through the ``tokenizers`` package."""

    name = "hf"

    # Special tokens looked up by name when the caller does not name them.
    _BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "[BOS]", "<|bos|>")
    _EOS_NAMES = ("<|end_of_text|>", "</s>", "<eos>", "[EOS]", "<|endoftext|>", "<|eos|>")
    _PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>")

    def __init__(self, path: str | os.PathLike, bos: Optional[str] = None, eos: Optional[str] = None):
        try:  # optional (longtrain[hf]): only a Hugging Face tokenizer.json needs it
            from tokenizers import Tokenizer
        except ImportError:  # pragma: no cover - the hf extra is missing
            raise DataError(f"data.tokenizer={str(path)!r} needs the 'tokenizers' package; "
                            f"install it with `pip install tokenizers` (or longtrain[hf]).") from None
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise DataError(f"data.tokenizer={str(path)!r}: no tokenizer.json found at {p}; give 'byte' "
                            f"or the path of a local Hugging Face tokenizer.json (or its folder).")
        self.path = p
        self.spec = str(path)
        raw = p.read_bytes()
        try:
            self._tok = Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:
            raise DataError(f"data.tokenizer={str(path)!r}: {p} is not a valid tokenizer.json ({e}); "
                            f"save it with tokenizers' Tokenizer.save().") from None
        # The canonical JSON (sorted keys) hashes the same however the file was formatted.
        canon = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()
        self._fingerprint = "hf-" + hashlib.sha256(canon).hexdigest()[:24]
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._find(bos, self._BOS_NAMES)
        self.eos_id = self._find(eos, self._EOS_NAMES)
        self.pad_id = self._find(None, self._PAD_NAMES)

    def _find(self, explicit: Optional[str], names: Sequence[str]) -> Optional[int]:
        if explicit is not None:
            tid = self._tok.token_to_id(explicit)
            if tid is None:
                raise DataError(f"tokenizer {self.path}: special token {explicit!r} is not in its vocabulary.")
            return tid
        for n in names:
            tid = self._tok.token_to_id(n)
            if tid is not None:
                return tid
        return None

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encs]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])

    def fingerprint(self) -> str:
        return self._fingerprint


Tokenizer = ByteTokenizer | HFTokenizer


def load_tokenizer(spec: str) -> Tokenizer:
    """``"byte"`` -> ByteTokenizer; anything else is the path of a local tokenizer.json (or its folder)."""
    if spec in ("byte", "", None):
        return ByteTokenizer()
    return HFTokenizer(spec)


def encode_document(tok: Tokenizer, ids: np.ndarray) -> np.ndarray:
    """Wrap encoded text as a document: ``[bos] + ids + [eos]`` (where the tokenizer has them)."""
    parts = []
    if tok.bos_id is not None:
        parts.append(np.array([tok.bos_id], np.int32))
    parts.append(ids.astype(np.int32, copy=False))
    if tok.eos_id is not None:
        parts.append(np.array([tok.eos_id], np.int32))
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def describe(tok: Tokenizer) -> dict:
    """What the manifest records about a tokenizer."""
    return {"name": tok.name, "spec": tok.spec, "fingerprint": tok.fingerprint(),
            "vocab_size": int(tok.vocab_size), "bos_id": tok.bos_id, "eos_id": tok.eos_id,
            "pad_id": tok.pad_id}
