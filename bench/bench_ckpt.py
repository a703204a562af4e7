"""Checkpoint cost for one configuration: save and load time, size on disk, async-save stall.

    torchrun --nproc_per_node=1 bench/bench_ckpt.py --config llama3.2-1b --dir /tmp/ckpt --out ckpt.json

Builds the job through the normal path (``trainer.train.setup``), trains one step so the optimizer
state exists, then measures with the real ``Checkpointer``: a synchronous save (wall time and bytes
on disk), an asynchronous save (how long the training loop is blocked by ``save()``, then the time
of a training step that runs while the write goes on, against one without a write in flight), and a
load of the committed checkpoint into the live model and optimizer.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402

from longtrain.config import load_config  # noqa: E402
from longtrain.trainer.checkpoint import Checkpointer  # noqa: E402
from longtrain.trainer.checkpoint_format import read_latest  # noqa: E402
from longtrain.trainer.train import TrainState, setup  # noqa: E402
from longtrain.trainer.step import forward_backward  # noqa: E402


def sync(dims):
    if dims.device.type == "cuda":
        torch.cuda.synchronize()
    if dims.distributed:
        torch.distributed.barrier()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="llama3.2-1b")
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--dir", default="/tmp/longtrain_ckpt_bench")
    ap.add_argument("--out", default="")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke: tiny model")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    shutil.rmtree(a.dir, ignore_errors=True)
    over = [f"data.seq_len={a.seq_len}", "data.source=synthetic", "data.batch_size=1", "memory.policy=manual",
            "memory.recompute=full", f"logging.run_dir={a.dir}", "logging.progress=false", "schedule.eval_every=0",
            "checkpoint.keep_last=4", *a.overrides]
    if a.tiny:
        over += ["model.vocab_size=264", "model.dim=64", "model.n_layers=2", "model.n_heads=4",
                 "model.n_kv_heads=2", "model.ffn_dim=128", "schedule.dtype=fp32"]
    cfg = load_config(a.config, over)
    cfg, dims, model, optimizer, scheduler, loader, _ = setup(cfg)
    state = TrainState()
    ckpt = Checkpointer(cfg, dims, Path(a.dir), model=model, optimizer=optimizer, scheduler=scheduler,
                        loader=loader, state=state)

    def train_step():
        fb = forward_backward(model, [next(loader)], dims, cfg, None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        return fb

    train_step()
    sync(dims)
    t = time.perf_counter()
    train_step()
    sync(dims)
    step_plain = time.perf_counter() - t

    t = time.perf_counter()
    ckpt.save(sync=True)
    sync(dims)
    save_sync = time.perf_counter() - t
    path = read_latest(ckpt.root if hasattr(ckpt, "root") else Path(a.dir) / "checkpoints")
    size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())

    # two async saves: the first may allocate staging buffers (checkpoint.staging=background keeps
    # pinned ones for the run), the second is what every later save costs; the loop's cost is the
    # stall until save() returns plus how much longer the next step takes (with background staging
    # its optimizer step waits for the copy)
    firsts = {}
    for attempt in range(2):
        train_step()
        sync(dims)
        t = time.perf_counter()
        ckpt.save(sync=False)
        stall = time.perf_counter() - t
        t = time.perf_counter()
        train_step()
        sync(dims)
        step_during = time.perf_counter() - t
        t = time.perf_counter()
        ckpt.wait()
        sync(dims)
        wait_rest = time.perf_counter() - t
        if attempt == 0:
            firsts = {"first_async_stall_s": stall, "first_step_during_async_write_s": step_during}

    latest = read_latest(Path(a.dir) / "checkpoints")
    t = time.perf_counter()
    ckpt.load(latest)
    sync(dims)
    load_s = time.perf_counter() - t
    n_params = sum(p.numel() for p in model.parameters())
    rec = {"config": a.config, "world_size": dims.world_size, "params": n_params,
           "checkpoint_bytes": size, "checkpoint_gib": size / 2**30, "save_sync_s": save_sync,
           "async_stall_s": stall, "step_plain_s": step_plain, "step_during_async_write_s": step_during,
           "async_remaining_wait_s": wait_rest, **firsts, "staging": cfg.checkpoint.staging,
           "load_s": load_s, "dir": a.dir,
           "device": torch.cuda.get_device_name() if dims.device.type == "cuda" else "cpu",
           "command": " ".join(sys.argv)}
    if dims.is_main:
        print(json.dumps(rec, indent=1), flush=True)
        if a.out:
            Path(a.out).write_text(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
