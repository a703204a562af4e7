"""A collective that never completes ends the job within ``parallel.timeout_s``, with an error that
names the stuck rank, the operation and the step -- not a silent hang, not a bare gloo timeout.

One rank of a 2-worker local launch stalls for ever (``LONGTRAIN_FAULT=stall@...``: before an
all-reduce, mid-forward, or inside a checkpoint write); the collective
watchdog (``longtrain.parallel.watchdog``) of the waiting rank diagnoses it from the ranks'
heartbeats in the job's store, every rank exits with ``EXIT_CODE_HUNG`` and the launcher reports the
failure. Nothing may be left running.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from longtrain.parallel.watchdog import EXIT_CODE_HUNG
from test_launch_common import TINY, alive, cmdline, descendants, longtrain_cmd, worker_env

TIMEOUT_S = 5


def launch_stalled(run_dir, fault: str, *extra):
    env = worker_env()
    env["LONGTRAIN_FAULT"] = fault
    proc = subprocess.Popen(longtrain_cmd("launch", "launch.backend=local", "launch.nproc_per_node=2", *TINY,
                                          "schedule.steps=50", f"parallel.timeout_s={TIMEOUT_S}",
                                          f"logging.run_dir={run_dir}", *extra),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: set[int] = set()
    t0 = time.monotonic()
    try:
        while proc.poll() is None and time.monotonic() - t0 < 120:
            seen |= descendants(proc.pid)
            time.sleep(0.2)
        out, _ = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, time.monotonic() - t0, seen


@pytest.mark.parametrize("fault,expect,extra", [
    # stalls before an all-reduce: the other rank waits in it, the stalled one never arrives
    ("stall@step:3:phase=collective:rank=1",
     r"rank 1 stuck before all_reduce\(dp_sp\) at step 3 for [0-9.]+ s.*waiting: rank 0 in all_reduce\(dp_sp\) at step 3",
     ()),
    # stalls mid-forward: rank 0 waits inside FSDP's all-gather; rank 1 is the one outside any collective
    ("stall@step:2:phase=forward:rank=1",
     r"rank 1 stuck in forward_backward at step 2 for [0-9.]+ s, outside any collective call", ()),
    # stalls in a (synchronous) checkpoint write, its shards written: rank 0 waits in the save's gather
    ("stall@step:4:phase=checkpoint-write:rank=1",
     r"rank 1 stuck in checkpoint save at step 4 for [0-9.]+ s, outside any collective call",
     ("checkpoint.every_steps=4",)),
], ids=["before-all-reduce", "mid-forward", "mid-checkpoint-write"])
def test_stalled_rank_ends_the_job_within_the_timeout_naming_rank_op_and_step(tmp_path, fault, expect, extra):
    import re

    rc, out, elapsed, seen = launch_stalled(tmp_path, fault, *extra)
    assert rc == 1, out[-4000:]
    assert re.search(expect, out), out[-4000:]
    assert f"parallel.timeout_s={TIMEOUT_S}" in out and f"exit code {EXIT_CODE_HUNG}" in out
    # start-up (~5 s on 2 cores) + the stall reaching the watchdog's deadline (0.9 x timeout) + the exit
    assert elapsed < 30 + TIMEOUT_S, f"took {elapsed:.0f} s"
    leftover = [p for p in seen if alive(p)]
    assert not leftover, f"processes left: {[(p, cmdline(p)) for p in leftover]}"


class _DictStore:
    """The two store calls the watchdog uses, in memory (one process plays every rank)."""

    def __init__(self):
        self.d = {}

    def set(self, k, v):
        self.d[k] = v.encode() if isinstance(v, str) else v

    def get(self, k):
        return self.d[k]

    def check(self, keys):
        return all(k in self.d for k in keys)


def test_a_long_operation_with_no_rank_behind_is_not_a_hang_but_a_rank_behind_is():
    from longtrain.parallel.watchdog import CollectiveWatchdog

    store = _DictStore()
    r0 = CollectiveWatchdog(0, 2, timeout_s=1.0, store=store, interval=0.05, exit_on_hang=False)
    r1 = CollectiveWatchdog(1, 2, timeout_s=1.0, store=store, interval=0.05, exit_on_hang=False)
    r0.step = r1.step = 7
    with r1.watch("forward_backward"):
        pass
    r1._publish()
    with r0.watch("forward_backward"):  # both ranks did the same operations: long compute, no hang
        r0._publish()
        assert not r0._hung()
    r1.start()  # rank 1 is alive (heartbeats) but stalls between operations
    r0.start()
    try:
        with r0.watch("all_reduce(dp_sp)"):  # rank 0 waits here; rank 1 never arrives
            time.sleep(1.5)
    finally:
        r0.stop()
        r1.stop()
    assert r0.verdict is not None and "rank 1 stuck before all_reduce(dp_sp) at step 7" in r0.verdict, r0.verdict
    assert r1.verdict == r0.verdict  # posted to the store; rank 1's own watchdog ended it too
