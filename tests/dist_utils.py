"""Spawning a small gloo process group inside a test: ``run_distributed(fn, world_size, *args)``.

Owns the one helper every distributed test uses. Each rank is a fresh process (torch
multiprocessing, ``spawn``) with the environment a launcher like torchrun gives it (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a free port), so code under test can call
``longtrain.parallel.init_distributed`` exactly as in training. The helper returns every rank's
(picklable) return value in rank order. If any rank raises, the others are stopped and the test
fails with that rank's full traceback -- a hung collective then costs ``timeout`` seconds, not
the whole test session.

``fn`` must be importable by name (a module-level function), because ``spawn`` pickles it.
By default the helper also initialises the default process group (gloo) before calling ``fn``;
pass ``init_process_group=False`` to test code that initialises it itself.
"""

from __future__ import annotations

import os
import queue
import socket
import traceback
from datetime import timedelta

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, init_pg, results):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # many ranks on few cores: one intra-op thread each, or they fight over the cores
    import torch

    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        if init_pg:
            dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
        out = fn(*args)
        results.put((rank, True, out))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent with its traceback
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class DistributedTestError(AssertionError):
    """A rank raised; the message holds its traceback."""


def run_distributed(fn, world_size: int, *args, timeout: float = 180.0, init_process_group: bool = True):
    """Run ``fn(*args)`` on ``world_size`` gloo ranks; return ``[result of rank 0, rank 1, ...]``."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, init_process_group, results),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, object] = {}
    try:
        while len(out) < world_size:
            try:
                rank, ok, value = results.get(timeout=timeout)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in out]
                raise DistributedTestError(
                    f"run_distributed({fn.__name__}, world_size={world_size}): no result for {timeout:.0f}s; "
                    f"ranks done {sorted(out)}, ranks exited without a result {dead} (a hung collective?)"
                ) from None
            if not ok:
                raise DistributedTestError(f"rank {rank} of {world_size} failed in {fn.__name__}:\n{value}")
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5 if len(out) == world_size else 0.1)
        for p in procs:  # only the processes started above, one by one
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    return [out[r] for r in range(world_size)]
