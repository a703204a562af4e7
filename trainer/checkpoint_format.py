"""A checkpoint on disk: its directory format, and reading and verifying it without a process group.

Owns: the names and files a checkpoint is made of, finding checkpoints (``step_dirs``,
``read_latest``, ``resolve_checkpoint_path``), reading their side files (``read_meta``,
``read_config``), deciding whether one is complete (``verify_checkpoint``) and fits a model
(``check_model_compatible``, ``check_tensor_shapes``), and reading one whole into a single process
(``load_full_model_state``, ``describe_checkpoint``). The run-time ``Checkpointer``
(``longtrain.trainer.checkpoint``), ``longtrain ckpt`` (``ckpt_cli``) and Hugging Face export
(``hf``) all read checkpoints through this module; it writes nothing.

On disk, under ``checkpoint.dir`` (default ``<run_dir>/checkpoints``)::

    step-200/            a complete checkpoint (torch.distributed.checkpoint shards)
      .metadata          DCP's index: every tensor's global shape and where its chunks live
      __<rank>_<i>.distcp  the shards, each rank writes its own
      config.yaml        the resolved config of the run that wrote it
      meta.json          step, tokens, the mesh layout it was written with, versions
    step-300.tmp/        a save in progress (or an interrupted one): never read
    latest               text file naming the newest committed step directory

Complete means: ``.metadata`` readable, ``meta.json`` and ``config.yaml`` present, and every
shard file the metadata references present and long enough. A checkpoint that is not complete
raises ``CheckpointCorrupt`` (``resume=auto`` falls back to the one before); a complete one
written for another model shape raises ``CheckpointMismatch`` (never skipped).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

from longtrain.errors import UserError

# a single process saves and loads without a process group on purpose; DCP warns about it each time
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

STEP_DIR_RE = re.compile(r"^step-(\d+)$")
LATEST = "latest"
# 2: optimizer state flattened per parameter, keys named as the whole model (1: nested
# ``param_groups.<i>``, pipeline stage prefixes; still read when no pipeline is involved)
FORMAT_VERSION = 2

# model-config fields that decide tensor shapes or which tensors exist: resuming across a change
# in any of them cannot work
SHAPE_KEYS = {"llama": ("arch", "vocab_size", "dim", "n_heads", "n_kv_heads", "ffn_dim", "n_layers", "tie_embeddings",
                       "sigma_reparam"),
              "looped": ("arch", "vocab_size", "dim", "n_heads", "n_kv_heads", "ffn_dim", "tie_embeddings",
                         "n_prelude", "n_core", "n_coda", "loops_max", "lora_rank", "reinject", "core_attention",
                         "hyper_streams", "sigma_reparam")}
LAYOUT_KEYS = ("dp_replicate", "dp_shard", "sp", "tp", "pp", "world_size")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be used; the message names the checkpoint and what is wrong."""

    kind = "checkpoint"


class CheckpointCorrupt(CheckpointError):
    """Incomplete or damaged on disk (missing/truncated files): ``resume=auto`` falls back."""


class CheckpointMismatch(CheckpointError):
    """Complete, but written for another model: never silently skipped."""


def step_dirs(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Committed ``step-N`` directories under ``root``, oldest first (``.tmp`` ones excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = STEP_DIR_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def read_latest(root: str | os.PathLike) -> Optional[Path]:
    """The step directory ``latest`` names, or None."""
    f = Path(root) / LATEST
    if not f.is_file():
        return None
    name = f.read_text().strip()
    return Path(root) / name if name else None



def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """A step directory, or a checkpoint root (its ``latest``, else its newest step directory)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path {str(p)!r} does not exist; give a step directory "
                              f"(.../checkpoints/step-N) or a checkpoint directory holding them.")
    if (p / ".metadata").exists() or (p / "meta.json").exists():
        return p
    latest = read_latest(p)
    if latest is not None and latest.is_dir():
        return latest
    dirs = step_dirs(p)
    if dirs:
        return dirs[-1][1]
    raise CheckpointError(f"{p} is neither a checkpoint (no .metadata) nor a directory of step-N "
                          f"checkpoints.")


def read_meta(path: str | os.PathLike) -> dict:
    f = Path(path) / "meta.json"
    if not f.is_file():
        raise CheckpointCorrupt(f"checkpoint {path}: meta.json is missing (an incomplete save?).")
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointCorrupt(f"checkpoint {path}: meta.json is unreadable ({e}).") from None


def read_config(path: str | os.PathLike) -> dict:
    f = Path(path) / "config.yaml"
    if not f.is_file():
        raise CheckpointCorrupt(f"checkpoint {path}: config.yaml is missing (an incomplete save?).")
    try:
        return yaml.safe_load(f.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointCorrupt(f"checkpoint {path}: config.yaml is unreadable ({e}).") from None


def verify_checkpoint(path: str | os.PathLike):
    """Check a checkpoint is complete on disk; return DCP's ``Metadata``.

    Complete means: ``.metadata`` present and readable, ``meta.json`` and ``config.yaml``
    present, and every shard file the metadata references exists and is at least as long as the
    last byte range it is said to hold. Contents are not checksummed.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointCorrupt(f"checkpoint {path} is not a directory.")
    if not (path / ".metadata").is_file():
        raise CheckpointCorrupt(f"checkpoint {path}: .metadata is missing; the save did not finish.")
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise CheckpointCorrupt(f"checkpoint {path}: .metadata is unreadable ({type(e).__name__}: {e}).") from None
    read_meta(path)
    read_config(path)
    need: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        rel = str(info.relative_path)
        need[rel] = max(need.get(rel, 0), int(info.offset) + int(info.length))
    for rel, end in sorted(need.items()):
        f = path / rel
        if not f.is_file():
            raise CheckpointCorrupt(f"checkpoint {path}: shard file {rel} is missing.")
        size = f.stat().st_size
        if size == 0 or size < end:
            raise CheckpointCorrupt(f"checkpoint {path}: shard file {rel} is truncated "
                                    f"({size} bytes, the metadata needs {end}).")
    return metadata


def check_model_compatible(path: Path, saved_cfg: dict, model_cfg) -> None:
    """Raise ``CheckpointMismatch`` naming every model-shape field that differs."""
    saved = saved_cfg.get("model", {})
    keys = SHAPE_KEYS.get(model_cfg.arch, SHAPE_KEYS["looped"])
    diffs = [f"model.{k}: checkpoint {saved[k]!r}, this run {getattr(model_cfg, k)!r}"
             for k in keys if k in saved and saved[k] != getattr(model_cfg, k)]
    if diffs:
        raise CheckpointMismatch(
            f"checkpoint {path} was written for a different model shape: " + "; ".join(diffs)
            + ". Resume with the checkpoint's model settings, or start fresh with checkpoint.resume=none "
              "(or another checkpoint.dir).")


def _global_shape(t) -> tuple:
    return tuple(t.shape)  # DTensor.shape is the global shape


def check_tensor_shapes(path: Path, metadata, prefix: str, state: dict) -> None:
    """Every tensor of ``state`` (keys under ``prefix``) exists in the checkpoint with its shape."""
    saved = metadata.state_dict_metadata
    missing, wrong = [], []
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            continue
        md = saved.get(f"{prefix}.{name}")
        if md is None:
            missing.append(name)
        elif isinstance(md, TensorStorageMetadata) and tuple(md.size) != _global_shape(t):
            wrong.append(f"{name}: checkpoint {tuple(md.size)}, model {_global_shape(t)}")
    if missing or wrong:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:5]}" + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
        if wrong:
            parts.append("shape differs: " + "; ".join(wrong[:5]))
        raise CheckpointMismatch(f"checkpoint {path} does not fit this model's {prefix}: " + ", ".join(parts) + ".")


def load_full_model_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model tensors of a checkpoint as full (unsharded) CPU tensors, keyed by parameter name."""
    path = Path(path)
    metadata = verify_checkpoint(path)
    model = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if fqn.startswith("model.") and isinstance(md, TensorStorageMetadata):
            model[fqn[len("model."):]] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
    if not model:
        raise CheckpointCorrupt(f"checkpoint {path} holds no model tensors.")
    state = {"model": model}
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    return state["model"]


def describe_checkpoint(path: str | os.PathLike) -> dict:
    """What ``longtrain ckpt inspect`` prints: step, layout, tensors with shapes and bytes."""
    path = Path(path)
    metadata = verify_checkpoint(path)
    meta = read_meta(path)
    tensors, blobs = [], []
    for fqn, md in sorted(metadata.state_dict_metadata.items()):
        if isinstance(md, TensorStorageMetadata):
            n = 1
            for s in md.size:
                n *= int(s)
            nbytes = n * md.properties.dtype.itemsize
            tensors.append({"name": fqn, "shape": list(md.size), "dtype": str(md.properties.dtype).replace("torch.", ""),
                            "bytes": nbytes, "chunks": len(md.chunks)})
        elif isinstance(md, BytesStorageMetadata):
            blobs.append(fqn)
    files = sorted(p for p in path.iterdir() if p.is_file())
    return {"path": str(path), "step": meta.get("step"), "tokens": meta.get("tokens"), "layout": meta.get("layout"),
            "arch": meta.get("arch"), "time": meta.get("time"), "torch": meta.get("torch"),
            "tensors": tensors, "objects": blobs,
            "tensor_bytes": sum(t["bytes"] for t in tensors),
            "disk_bytes": sum(p.stat().st_size for p in files), "files": len(files)}
