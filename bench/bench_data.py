"""Data pipeline throughput: ``prepare`` tokens/s and reading packed 1M-token sequences from shards.

Measures, on this machine (each number the median of 3 runs; all runs are in the JSON):
1. ``prepare`` of the Python standard library's source (~10 MB) with 1 and 2 workers, with the
   byte tokenizer and with a 4096-token BPE ``tokenizer.json`` trained here on 1 MB of it;
2. the loader reading packed sequences of ``--seq-len`` (default 1,048,576) tokens from those
   shards, greedy and best-fit packing, whole sequences (sp=1) and one sp=8 slice;
3. the embedded default loader (stdlib, 8 x 256) per micro-batch.
Prints a table and writes JSON (``--json``).

    PYTHONPATH=. python bench/bench_data.py --json /tmp/bench_data.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from longtrain.config import DataConfig
from longtrain.data.loader import _DOCS_CACHE, build_loader
from longtrain.data.prepare import prepare


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def train_bpe(path: Path, vocab: int = 4096) -> str:
    """A BPE tokenizer.json trained on 1 MB of stdlib source (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from longtrain.data.sources import stdlib_files

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((p.read_text(errors="replace") for p in stdlib_files(1 << 20)), trainer)
    tok.save(str(path))
    return str(path)


def bench_prepare(tmp: Path, workers: int, shard_mb: float, tokenizer: str = "byte", repeat: int = 3) -> dict:
    out = tmp / f"prep-w{workers}-{Path(tokenizer).stem}"
    times = []
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        m = prepare(["stdlib"], out, tokenizer=tokenizer, workers=workers, shard_mb=shard_mb, progress=False)
        times.append(time.perf_counter() - t0)
    dt = _median(times)
    name = "byte" if tokenizer == "byte" else "bpe4096"
    return {"name": f"prepare stdlib {name} --workers {workers}", "tokens": m["num_tokens"], "docs": m["num_docs"],
            "shards": len(m["shards"]), "seconds": dt, "seconds_all": times, "tokens_per_s": m["num_tokens"] / dt,
            "text_bytes_per_s": sum(e["text_bytes"] for e in m["shards"]) / dt, "dir": str(out)}


def bench_read(shards: str, seq_len: int, n: int, packing: str, sp_size: int = 1, repeat: int = 3) -> dict:
    runs = [_bench_read_once(shards, seq_len, n, packing, sp_size) for _ in range(repeat)]
    best = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
    return dict(best, seconds_all=[r["seconds"] for r in runs])


def _bench_read_once(shards: str, seq_len: int, n: int, packing: str, sp_size: int) -> dict:
    _DOCS_CACHE.clear()
    cfg = DataConfig(source="shards", path=shards, seq_len=seq_len, batch_size=1, packing=packing,
                     eval_fraction=0.0, verify_checksums=False)
    t0 = time.perf_counter()
    loader = build_loader(cfg, vocab_size=264, sp_rank=0, sp_size=sp_size)
    open_s = time.perf_counter() - t0
    next(loader)  # warm: first row groups, first window plan
    t0 = time.perf_counter()
    for _ in range(n):
        b = next(loader)
    dt = time.perf_counter() - t0
    toks = n * b["tokens"].numel()
    real = int((b["labels"] != -100).sum())
    return {"name": f"read {packing} seq_len={seq_len} sp=1/{sp_size}", "sequences": n, "tokens": toks,
            "seconds": dt, "tokens_per_s": toks / dt, "ms_per_sequence": 1e3 * dt / n, "open_s": open_s,
            "fill": loader.order.window_plan(0).fill(), "last_batch_trained_labels": real}


def bench_default(n: int = 250) -> dict:
    _DOCS_CACHE.clear()
    t0 = time.perf_counter()
    loader = build_loader(DataConfig(), vocab_size=264)
    next(loader)
    open_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(n):
        b = next(loader)
    dt = time.perf_counter() - t0
    toks = n * b["tokens"].numel()
    return {"name": "default stdlib loader 8x256", "tokens": toks, "seconds": dt, "tokens_per_s": toks / dt,
            "ms_per_batch": 1e3 * dt / n, "open_s": open_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=1 << 20)
    ap.add_argument("--sequences", type=int, default=12, help="sequences read per measurement")
    ap.add_argument("--shard-mb", type=float, default=2.0)
    ap.add_argument("--json", default="/tmp/bench_data.json")
    ap.add_argument("--keep", action="store_true", help="keep the prepared shards")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    rows = [bench_prepare(tmp, 1, args.shard_mb), bench_prepare(tmp, 2, args.shard_mb)]
    shards = rows[0]["dir"]
    bpe = train_bpe(tmp / "bpe4096.json")
    rows += [bench_prepare(tmp, 1, args.shard_mb, bpe), bench_prepare(tmp, 2, args.shard_mb, bpe)]
    for packing in ("greedy", "best_fit"):
        rows.append(bench_read(shards, args.seq_len, args.sequences, packing))
    rows.append(bench_read(shards, args.seq_len, args.sequences, "best_fit", sp_size=8))
    rows.append(bench_default())
    print(f"{'benchmark':45s} {'tokens':>11s} {'seconds':>8s} {'Mtok/s':>8s}  extra")
    for r in rows:
        extra = ", ".join(f"{k}={r[k]:.3g}" for k in ("ms_per_sequence", "ms_per_batch", "fill", "open_s") if k in r)
        print(f"{r['name']:45s} {r['tokens']:>11d} {r['seconds']:>8.3f} {r['tokens_per_s'] / 1e6:>8.2f}  {extra}")
    info = {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"), "args": vars(args), "results": rows}
    Path(args.json).write_text(json.dumps(info, indent=1))
    print(f"wrote {args.json}")
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
