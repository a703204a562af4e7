"""``longtrain ckpt``: list, inspect, consolidate and convert checkpoints without a process group.

Owns: the argparse wiring only; the work is in ``longtrain.trainer.checkpoint_format`` (the
on-disk format, read without a process group) and ``longtrain.trainer.hf`` (Hugging Face
conversion: Llama, Qwen3, Gemma 2 and Gemma 3).

    longtrain ckpt list DIR                      committed checkpoints, their step, size, layout
    longtrain ckpt inspect PATH [--json]         tensors (name, shape, dtype, bytes), totals, layout
    longtrain ckpt consolidate PATH OUT.pt       one torch.save file (everything, unsharded)
    longtrain ckpt export-hf PATH OUTDIR         HF safetensors + config.json (Llama/Qwen3/Gemma 2/3)
    longtrain ckpt hf-config HFDIR               the longtrain model section for an HF directory
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import yaml
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from longtrain.errors import UserError, report_user_error
from longtrain.trainer.checkpoint_format import (LAYOUT_KEYS, CheckpointError, describe_checkpoint, read_latest,
                                                 read_meta, resolve_checkpoint_path, step_dirs, verify_checkpoint)
from longtrain.trainer.hf import export_hf, hf_model_config, read_hf_config


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _layout(lay: dict | None) -> str:
    if not lay:
        return "?"
    return " ".join(f"{k}={lay[k]}" for k in LAYOUT_KEYS if k in lay)


def _list(ns) -> int:
    root = Path(ns.dir)
    if not root.is_dir():
        print(f"longtrain ckpt list: {root} is not a directory", file=sys.stderr)
        return 1
    if (root / "checkpoints").is_dir() and not step_dirs(root):
        root = root / "checkpoints"  # a run directory
    latest = read_latest(root)
    dirs = step_dirs(root)
    tmp = sorted(p.name for p in root.glob("step-*.tmp"))
    if not dirs:
        print(f"{root}: no committed checkpoints" + (f" ({len(tmp)} interrupted: {', '.join(tmp)})" if tmp else ""))
        return 0
    print(f"{root}  (latest: {latest.name if latest else '-'})")
    for step, p in dirs:
        try:
            verify_checkpoint(p)
            meta = read_meta(p)
            status = "ok"
        except CheckpointError as e:
            meta, status = {}, f"DAMAGED: {e}"
        size = sum(f.stat().st_size for f in p.iterdir() if f.is_file())
        mark = "*" if latest == p else " "
        print(f" {mark} {p.name:<14} step={step:<8} {_human(size):>10}  {_layout(meta.get('layout'))}  {status}")
    if tmp:
        print(f"   interrupted saves (ignored, removed by the next run): {', '.join(tmp)}")
    return 0


def _inspect(ns) -> int:
    d = describe_checkpoint(resolve_checkpoint_path(ns.path))
    if ns.json:
        print(json.dumps(d, indent=1))
        return 0
    print(f"{d['path']}\n  step {d['step']}  tokens {d['tokens']}  arch {d['arch']}  written {d['time']} "
          f"(torch {d['torch']})\n  layout: {_layout(d['layout'])}\n"
          f"  tensors: {len(d['tensors'])}, {_human(d['tensor_bytes'])}; on disk {_human(d['disk_bytes'])} "
          f"in {d['files']} files")
    groups: dict[str, list] = {}
    for t in d["tensors"]:
        groups.setdefault(t["name"].split(".", 1)[0], []).append(t)
    for g, ts in groups.items():
        print(f"  [{g}] {len(ts)} tensors, {_human(sum(t['bytes'] for t in ts))}")
        if g == "model" or ns.all:
            for t in ts:
                print(f"    {t['name']:<60} {str(tuple(t['shape'])):<16} {t['dtype']:<9} {_human(t['bytes']):>10}")
    if d["objects"]:
        print(f"  objects: {', '.join(d['objects'])}")
    return 0


def _consolidate(ns) -> int:
    path = resolve_checkpoint_path(ns.path)
    verify_checkpoint(path)
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    dcp_to_torch_save(str(path), ns.out)
    print(f"wrote {ns.out} ({_human(Path(ns.out).stat().st_size)}) from {path}")
    return 0


def _export_hf(ns) -> int:
    out = export_hf(ns.path, ns.outdir, dtype=ns.dtype)
    arch = read_hf_config(out)["architectures"][0]
    print(f"wrote Hugging Face {arch} checkpoint to {out} (config.json + safetensors, {ns.dtype})")
    return 0


def _hf_config(ns) -> int:
    m = hf_model_config(read_hf_config(ns.hfdir), where=f"{ns.hfdir}/config.json")
    d = dataclasses.asdict(m)
    keep = ("arch", "vocab_size", "dim", "n_heads", "n_kv_heads", "ffn_dim", "n_layers", "norm_eps", "rope_theta",
            "rope_scaling", "tie_embeddings", "norm_placement", "qk_norm")
    print(yaml.safe_dump({"model": {k: d[k] for k in keep}}, sort_keys=False), end="")
    print(f"# use with: checkpoint.init_from_hf={ns.hfdir}")
    return 0


def _guard(fn):
    def run(ns):
        try:
            return fn(ns)
        except UserError as e:  # a checkpoint or config problem: one line, exit code 2
            return report_user_error(e, "longtrain ckpt")
    return run


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register ``ckpt`` and its subcommands on an argparse subparsers object."""
    ck = subparsers.add_parser("ckpt", help="list, inspect, consolidate and convert checkpoints")
    sub = ck.add_subparsers(dest="ckpt_command", required=True)
    p = sub.add_parser("list", help="committed checkpoints in a checkpoint (or run) directory")
    p.add_argument("dir")
    p.set_defaults(func=_guard(_list))
    p = sub.add_parser("inspect", help="what a checkpoint holds: tensors, shapes, bytes, layout, step")
    p.add_argument("path", help="a step directory, or a checkpoint directory (uses its latest)")
    p.add_argument("--all", action="store_true", help="list optimizer tensors too")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_guard(_inspect))
    p = sub.add_parser("consolidate", help="write one unsharded torch.save file")
    p.add_argument("path")
    p.add_argument("out", metavar="OUT.pt")
    p.set_defaults(func=_guard(_consolidate))
    p = sub.add_parser("export-hf", help="Hugging Face directory (safetensors + config.json): Llama, Qwen3, "
                                         "Gemma 2 or Gemma 3")
    p.add_argument("path")
    p.add_argument("outdir")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=_guard(_export_hf))
    p = sub.add_parser("hf-config", help="print the longtrain model config of a Hugging Face directory")
    p.add_argument("hfdir")
    p.set_defaults(func=_guard(_hf_config))
    return ck
