"""``longtrain data ...``: the data subcommands (``prepare``, ``inspect``) for the main CLI.

Owns: ``add_cli(subparsers)``, which registers ``data prepare`` and ``data inspect`` on the main
CLI's argparse subparsers, and ``main()`` so the same commands run as ``python -m longtrain.data.cli``.
Each subcommand sets ``func`` to a callable taking the parsed args and returning an exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from longtrain.errors import UserError, report_user_error

from .prepare import prepare, read_manifest
from .shards import ShardDocuments
from .validate import DataError


def _prepare(args: argparse.Namespace) -> int:
    m = prepare(args.inputs, args.out, tokenizer=args.tokenizer, fmt=args.format, text_field=args.text_field,
                text_column=args.text_column, workers=args.workers, shard_mb=args.shard_mb,
                row_group_tokens=args.row_group_tokens, on_bad_document=args.on_bad_document,
                stdlib_mb=args.stdlib_mb, progress=not args.no_progress,
                on_empty_document=args.on_empty_document, min_length=args.min_length)
    skipped = ", ".join(f"{v} {k}" for k, v in m["skipped"].items()) or "none"
    print(f"{args.out}: {len(m['shards'])} shards, {m['num_docs']} documents, {m['num_tokens']} tokens "
          f"({m['_written']} shards written now; skipped documents: {skipped})")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    d = Path(args.path)
    m = read_manifest(d)
    if m is None:
        raise DataError(f"{d} holds no manifest.json; give a folder written by `longtrain data prepare`.")
    t = m["tokenizer"]
    print(f"{d}: complete={m['complete']} shards={len(m['shards'])} docs={m.get('num_docs')} "
          f"tokens={m.get('num_tokens')}")
    print(f"tokenizer: {t['spec']} ({t['fingerprint']}, vocab {t['vocab_size']})")
    if args.verify:
        docs = ShardDocuments(str(d), vocab_size=int(t["vocab_size"]), verify=True)
        lens = docs.lengths
        print(f"verified {len(m['shards'])} shards (sha256); document length min/median/max = "
              f"{lens.min()}/{int(sorted(lens)[len(lens) // 2])}/{lens.max()}")
    if args.json:
        print(json.dumps(m, indent=1))
    return 0


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register ``data`` (with ``prepare`` and ``inspect``) on an argparse subparsers object."""
    data = subparsers.add_parser("data", help="prepare and inspect token shards")
    sub = data.add_subparsers(dest="data_command", required=True)

    p = sub.add_parser("prepare", help="tokenize text into Parquet token shards + manifest.json (resumable)",
                       description="Tokenize plain text / JSONL / Parquet (or 'stdlib') into token shards. "
                                   "Re-running the same command resumes: shards in the manifest are skipped.")
    p.add_argument("inputs", nargs="+", help="files, folders, or 'stdlib' (the Python standard library)")
    p.add_argument("--out", required=True, help="output folder (shard-*.parquet + manifest.json)")
    p.add_argument("--tokenizer", default="byte", help="'byte' or a local Hugging Face tokenizer.json")
    p.add_argument("--format", default="auto", choices=["auto", "text", "jsonl", "parquet"],
                   help="input format; auto = by extension (.jsonl, .parquet, else plain text)")
    p.add_argument("--text-field", default="text", help="JSONL field that holds the text")
    p.add_argument("--text-column", default="text", help="Parquet column that holds the text")
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    p.add_argument("--shard-mb", type=float, default=64.0, help="MB of input text per shard")
    p.add_argument("--row-group-tokens", type=int, default=1 << 16, help="max tokens per Parquet row group")
    p.add_argument("--on-bad-document", default="error", choices=["error", "skip"],
                   help="documents that cannot be used (ids outside the vocabulary): error, or skip and count")
    p.add_argument("--on-empty-document", default="skip", choices=["skip", "error"],
                   help="empty documents (an empty __init__.py): skip and count (default), or error")
    p.add_argument("--min-length", type=int, default=0,
                   help="keep only documents of at least this many tokens (for long-context training); "
                        "recorded in the manifest, the dropped ones counted as 'short'")
    p.add_argument("--stdlib-mb", type=float, default=None, help="limit the 'stdlib' input to this many MB")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_prepare)

    i = sub.add_parser("inspect", help="summarize (and optionally verify) a prepared shard folder")
    i.add_argument("path", help="folder with manifest.json")
    i.add_argument("--verify", action="store_true", help="check every shard's sha256 and readability")
    i.add_argument("--json", action="store_true", help="print the whole manifest")
    i.set_defaults(func=_inspect)
    return data


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="longtrain")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        return report_user_error(e)


if __name__ == "__main__":
    sys.exit(main())
