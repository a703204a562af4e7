"""``longtrain data prepare``: text -> Parquet token shards + ``manifest.json``, streaming and resumable.

Owns: cutting the input stream into shards, tokenizing shards in worker processes, writing each
shard (one row per document: ``tokens`` list<int32>, ``length`` int32, ``source`` string; row
groups of at most ``row_group_tokens`` tokens), and the manifest that records the tokenizer, the
job's settings and every completed shard (documents, tokens, bytes, sha256, largest token id).

The idea. Shard boundaries are decided on the *text* stream (a shard closes once it holds
``shard_mb`` of UTF-8 text), before tokenizing, so they do not depend on how many workers run:
``--workers 4`` writes byte-identical shards to ``--workers 1``. The main process only reads text
and hands whole shards to workers, with at most ``2 * workers`` shards in flight, so memory is
bounded by ``~2 * workers * shard_mb`` however large the corpus. Each shard is written to a
temporary name, renamed when complete and then recorded in the manifest (rewritten atomically),
so after a crash re-running the same command skips every recorded shard -- it re-reads their text
to find the next boundary, but does not tokenize or write it again.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import sys
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from .sources import expand_inputs, iter_texts, tokenize_texts
from .tokenizer import describe, load_tokenizer
from .validate import BadDocuments, DataError, sha256_file

MANIFEST = "manifest.json"
FORMAT = "longtrain-token-shards"
VERSION = 1


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def read_manifest(out_dir: Path) -> Optional[dict]:
    path = out_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); it is damaged. Delete it and re-run "
                        f"`longtrain data prepare` to rebuild the dataset.") from None
    if m.get("format") != FORMAT:
        raise DataError(f"{path} is not a longtrain shard manifest (format={m.get('format')!r}); point "
                        f"data.path at a folder written by `longtrain data prepare`.")
    return m


def write_manifest(out_dir: Path, manifest: dict) -> None:
    tmp = out_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out_dir / MANIFEST)


# --------------------------------------------------------------------------------------------
# One shard (runs in a worker)
# --------------------------------------------------------------------------------------------

_TOKENIZERS: dict = {}


def write_shard(index: int, texts: list[tuple[str, str]], out_dir: str, tokenizer: str,
                row_group_tokens: int, on_bad_document: str, on_empty_document: str = "skip",
                min_length: int = 0) -> dict:
    """Tokenize one shard's documents and write it; returns its manifest entry.

    Empty documents (an empty ``__init__.py``) are skipped and counted as ``empty`` unless
    ``on_empty_document="error"``; documents shorter than ``min_length`` tokens (as stored, with
    BOS/EOS) are dropped and counted as ``short``."""
    tok = _TOKENIZERS.get(tokenizer) or _TOKENIZERS.setdefault(tokenizer, load_tokenizer(tokenizer))
    bad = BadDocuments(on_bad_document, fix="pass --on-bad-document skip")
    if on_empty_document == "skip":
        kept = [(w, t) for w, t in texts if t.strip()]
        if len(kept) < len(texts):
            bad.skipped["empty"] = len(texts) - len(kept)
        texts = kept
    docs, names = tokenize_texts(tok, texts, bad)
    if min_length > 0:
        kept = [(d, n) for d, n in zip(docs, names) if len(d) >= min_length]
        if len(kept) < len(docs):
            bad.skipped["short"] = len(docs) - len(kept)
        docs, names = [d for d, _ in kept], [n for _, n in kept]
    path = Path(out_dir) / shard_name(index)
    tmp = path.with_suffix(".parquet.tmp")
    lengths = np.array([len(d) for d in docs], np.int64)
    schema = pa.schema([("tokens", pa.list_(pa.int32())), ("length", pa.int32()), ("source", pa.string())])
    row_groups = 0
    with pq.ParquetWriter(tmp, schema) as w:
        i = 0
        while i < len(docs):
            # A row group closes once it holds row_group_tokens tokens (at least one document).
            j, acc = i, 0
            while j < len(docs) and (j == i or acc + lengths[j] <= row_group_tokens):
                acc += lengths[j]
                j += 1
            offsets = np.zeros(j - i + 1, np.int32)
            np.cumsum(lengths[i:j], out=offsets[1:])
            values = np.concatenate(docs[i:j]).astype(np.int32, copy=False)
            table = pa.table({"tokens": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
                              "length": pa.array(lengths[i:j].astype(np.int32)),
                              "source": pa.array(names[i:j], pa.string())}, schema=schema)
            w.write_table(table, row_group_size=j - i)
            row_groups += 1
            i = j
    os.replace(tmp, path)
    return {"index": index, "file": path.name, "docs": len(docs), "tokens": int(lengths.sum()),
            "bytes": path.stat().st_size, "sha256": sha256_file(path), "row_groups": row_groups,
            "max_token_id": int(max((d.max() for d in docs), default=-1)), "skipped": dict(bad.skipped),
            "text_bytes": sum(len(t.encode("utf-8", "replace")) for _, t in texts)}


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------


def _shard_texts(texts: Iterator[tuple[str, str]], shard_bytes: int) -> Iterator[list[tuple[str, str]]]:
    batch, size = [], 0
    for where, text in texts:
        batch.append((where, text))
        size += len(text)  # characters: cheap, deterministic; close enough to bytes for a budget
        if size >= shard_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _worker_signals() -> None:
    """Pool workers die on SIGTERM (``Pool.terminate``) even when the parent had installed a
    Python handler for it (a trainer in the same process): a forked worker inherits the handler,
    which would only record the signal while the worker waits on the task queue forever."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle


def prepare(inputs: Sequence[str], out_dir: str | os.PathLike, *, tokenizer: str = "byte", fmt: str = "auto",
            text_field: str = "text", text_column: str = "text", workers: int = 1, shard_mb: float = 64.0,
            row_group_tokens: int = 1 << 16, on_bad_document: str = "error", stdlib_mb: Optional[float] = None,
            progress: bool = True, stop_after: Optional[int] = None, on_empty_document: str = "skip",
            min_length: int = 0) -> dict:
    """Prepare token shards in ``out_dir``; returns the manifest. Re-running resumes.

    ``stop_after`` (tests, benchmarks) stops once that many new shards were written, leaving an
    incomplete manifest exactly as a crash would.
    """
    if on_empty_document not in ("skip", "error") or min_length < 0:
        raise DataError(f"on_empty_document={on_empty_document!r} / min_length={min_length}: use 'skip' or 'error', "
                        f"and a minimum length >= 0 (--on-empty-document, --min-length).")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(tokenizer)
    files = expand_inputs(inputs, None if stdlib_mb is None else int(stdlib_mb * (1 << 20)))
    job = {"inputs": [str(p) for p in files], "format": fmt, "text_field": text_field,
           "text_column": text_column, "shard_mb": shard_mb, "row_group_tokens": row_group_tokens,
           "on_bad_document": on_bad_document, "tokenizer": tok.fingerprint(),
           "on_empty_document": on_empty_document, "min_length": int(min_length)}
    manifest = read_manifest(out)
    # a manifest from before these settings existed resumes under their defaults (its shards differ
    # at most by an empty document, which stopped that job)
    old_job = {"on_empty_document": "skip", "min_length": 0, **(manifest or {}).get("job", {})}
    if manifest is not None and old_job != job:
        changed = sorted(k for k in job if old_job.get(k) != job[k])
        raise DataError(f"{out / MANIFEST} was written by a prepare job with other settings ({', '.join(changed)} "
                        f"differ); re-run with the same arguments to resume, or give a new --out folder.")
    if manifest is None:
        manifest = {"format": FORMAT, "version": VERSION, "tokenizer": describe(tok), "job": job,
                    "complete": False, "shards": []}
    done = {}
    for e in manifest["shards"]:
        p = out / e["file"]
        if p.is_file() and p.stat().st_size == e["bytes"]:
            done[e["index"]] = e  # a recorded shard whose file is gone or cut short is rebuilt
    manifest["shards"] = sorted(done.values(), key=lambda e: e["index"])
    manifest["complete"] = False

    def record(entry: dict) -> None:
        done[entry["index"]] = entry
        manifest["shards"] = sorted(done.values(), key=lambda e: e["index"])
        write_manifest(out, manifest)
        bar.update(entry["text_bytes"])
        bar.set_postfix(shards=len(done), tokens=sum(e["tokens"] for e in done.values()))

    total = sum(p.stat().st_size for p in files)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="prepare", disable=not progress, file=sys.stderr)
    args = (str(out), tokenizer, row_group_tokens, on_bad_document, on_empty_document, min_length)
    t0, written, stopped = time.time(), 0, False
    unreadable = BadDocuments(on_bad_document, fix="pass --on-bad-document skip")  # not UTF-8 text
    stream = _shard_texts(iter_texts(files, fmt, text_field, text_column, bad=unreadable),
                          int(shard_mb * (1 << 20)))
    if workers <= 1:
        for index, texts in enumerate(stream):
            if index in done:
                bar.update(done[index].get("text_bytes", 0))
                continue
            if stop_after is not None and written >= stop_after:
                stopped = True
                break
            record(write_shard(index, texts, *args))
            written += 1
    else:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are the parallelism
        ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
        with ctx.Pool(workers, initializer=_worker_signals) as pool:
            pending: list = []
            for index, texts in enumerate(stream):
                if index in done:
                    bar.update(done[index].get("text_bytes", 0))
                    continue
                if stop_after is not None and written + len(pending) >= stop_after:
                    stopped = True
                    break
                pending.append(pool.apply_async(write_shard, (index, texts, *args)))
                while len(pending) >= 2 * workers:  # bounded memory: wait for the oldest shard
                    record(pending.pop(0).get())
                    written += 1
            for r in pending:
                record(r.get())
                written += 1
    bar.close()
    shards = manifest["shards"]
    manifest["num_docs"] = sum(e["docs"] for e in shards)
    manifest["num_tokens"] = sum(e["tokens"] for e in shards)
    counts = [e["skipped"] for e in shards] + [unreadable.skipped]
    manifest["skipped"] = {k: sum(c.get(k, 0) for c in counts) for k in sorted({k for c in counts for k in c})}
    manifest["complete"] = not stopped
    if not stopped and manifest["num_docs"] == 0:
        skipped = ", ".join(f"{v} {k}" for k, v in manifest["skipped"].items()) or "none"
        raise DataError(f"{len(files)} input file(s) ({', '.join(str(p) for p in files[:3])}"
                        f"{', ...' if len(files) > 3 else ''}) hold no documents to train on (skipped: {skipped}); "
                        f"check the inputs, --format and --text-field / --text-column, and --min-length.")
    write_manifest(out, manifest)
    manifest["_seconds"] = time.time() - t0
    manifest["_written"] = written
    return manifest
