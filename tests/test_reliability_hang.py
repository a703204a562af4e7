"""A collective that never completes ends the job within ``parallel.timeout_s``, with an error that
names the stuck rank, the operation and the step -- not a silent hang, not a bare gloo timeout.

One rank of a 2-worker local launch stalls for ever (``LONGTRAIN_FAULT=stall@...``: before an
all-reduce, mid-forward, or inside a checkpoint write); the collective
watchdog (``longtrain.parallel.watchdog``) of the waiting rank diagnoses it from the ranks'
heartbeats in the job's store, every rank exits with ``EXIT_CODE_HUNG`` and the launcher reports the
failure. Nothing may be left running.

Timing is asserted from the watchdog's own record of its detection (how long the waiting rank had
been in the operation, and when), not from the job's wall clock: start-up on a loaded 2-core
machine took anything from 5 to 50 s, and says nothing about the watchdog.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time

import pytest

from longtrain.parallel.watchdog import EXIT_CODE_HUNG
from test_launch_common import TINY, alive, cmdline, descendants, longtrain_cmd, worker_env

TIMEOUT_S = 5
# the watchdog polls every timeout_s / 20 = 0.25 s; its thread may wait for a busy CPU on top of that
DETECT_SLACK_S = 0.25 + 2.0
# from the detection to the launcher's exit: the watchdog posts its verdict and waits 2 polls + 0.5 s
# so the other ranks read it, then exits; the launcher notices within 0.2 s and stops the others
EXIT_SLACK_S = 20.0
# from stopping rank 0 to the launcher's exit: timeout_s of silence, one launcher poll, then elastic
# notices the killed worker (0.2 s) and stops the other one (its watchdog exits with code 86 anyway)
STOP_SLACK_S = 15.0
DETECTED = re.compile(r"detected after ([0-9.]+) s in .*? \(deadline ([0-9.]+) s\) at unix time ([0-9.]+)")


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
        ended_at = time.time()
        out, _ = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, ended_at, seen


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
    # stalls after its optimizer step: rank 0 waits in checkpoint.after_step's all-reduce of the save flags
    ("stall@step:3:phase=optimizer:rank=1",
     r"rank 1 stuck before all_reduce\(checkpoint flags\) at step 3 for [0-9.]+ s.*waiting: rank 0 in "
     r"all_reduce\(checkpoint flags\) at step 3", ()),
], ids=["before-all-reduce", "mid-forward", "mid-checkpoint-write", "checkpoint-flags-all-reduce"])
def test_stalled_rank_ends_the_job_within_the_timeout_naming_rank_op_and_step(tmp_path, fault, expect, extra):
    rc, out, ended_at, seen = launch_stalled(tmp_path, fault, *extra)
    assert rc == 1, out[-4000:]
    assert re.search(expect, out), out[-4000:]
    assert f"parallel.timeout_s={TIMEOUT_S}" in out and f"exit code {EXIT_CODE_HUNG}" in out
    # the watchdog's promise: a rank waiting on the stalled one is found 0.9 x timeout_s after it began to wait
    found = DETECTED.findall(out)
    assert found, out[-4000:]
    for after, deadline, at in found:
        assert float(deadline) == pytest.approx(0.9 * TIMEOUT_S)
        assert float(deadline) <= float(after) <= float(deadline) + DETECT_SLACK_S, out[-4000:]
    # and the job ends soon after the first detection, every process with it
    first = min(float(at) for _, _, at in found)
    assert ended_at - first < EXIT_SLACK_S, f"the job ended {ended_at - first:.1f} s after the detection"
    leftover = [p for p in seen if alive(p)]
    assert not leftover, f"processes left: {[(p, cmdline(p)) for p in leftover]}"


def _worker_of_rank(launcher_pid: int, rank: int) -> int | None:
    for pid in descendants(launcher_pid):
        try:
            env = dict(kv.split(b"=", 1) for kv in open(f"/proc/{pid}/environ", "rb").read().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if "longtrain.launch.worker" in cmdline(pid) and env.get(b"RANK") == str(rank).encode():
            return pid
    return None


def test_a_stopped_rank_0_which_serves_the_store_ends_the_job_within_the_timeout_naming_rank_0(tmp_path):
    """SIGSTOP rank 0 mid-run: its store freezes with it. The job still ends within about
    parallel.timeout_s of the stop (rank 1's watchdog names rank 0 without waiting on the store;
    the launcher kills the worker whose heartbeat stopped), and nothing is left running."""
    proc = subprocess.Popen(longtrain_cmd("launch", "launch.backend=local", "launch.nproc_per_node=2", *TINY,
                                          "schedule.steps=100000", f"parallel.timeout_s={TIMEOUT_S}",
                                          f"logging.run_dir={tmp_path}"),
                            env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stopped = None
    seen: set[int] = set()
    try:
        t0 = time.monotonic()
        while proc.poll() is None and time.monotonic() - t0 < 120 and stopped is None:
            seen |= descendants(proc.pid)
            metrics = tmp_path / "metrics.jsonl"
            rank0 = _worker_of_rank(proc.pid, 0)
            if rank0 and metrics.exists() and metrics.read_text().count('"loss"') >= 3:
                os.kill(rank0, signal.SIGSTOP)
                stopped = (rank0, time.monotonic())
            time.sleep(0.2)
        if stopped is None:
            proc.kill()
            pytest.fail("the job did not start training:\n" + proc.communicate(timeout=10)[0][-4000:])
        while proc.poll() is None and time.monotonic() - stopped[1] < 60:
            time.sleep(0.2)
        took = time.monotonic() - stopped[1]
        rc = proc.poll()
        out = proc.communicate(timeout=5)[0] if rc is not None else ""
    finally:
        for pid in ([stopped[0]] if stopped else []) + sorted(seen):  # only what this test started
            if alive(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGCONT)
                    os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 1, f"the job was still running {took:.0f} s after rank 0 was stopped"
    # the promise: rank 1's watchdog at 0.9 x timeout_s, the launcher's kill at timeout_s of silence
    assert took < TIMEOUT_S + STOP_SLACK_S, f"the job ended {took:.1f} s after rank 0 was stopped"
    assert re.search(r"rank 1: watchdog: .*rank 0 stuck in [^;]+ at step \d+ for [0-9.]+ s \(no heartbeat", out), \
        out[-4000:]
    assert re.search(r"launch: rank 0 \(pid \d+\) sent no heartbeat .*killing it", out), out[-4000:]
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
    # found 0.9 x timeout_s after rank 0 began to wait, within a poll interval plus scheduling slack
    assert r0.detection["op"] == "all_reduce(dp_sp)" and r0.detection["deadline_s"] == pytest.approx(0.9)
    assert 0.9 <= r0.detection["after_s"] <= 0.9 + 0.05 + DETECT_SLACK_S, r0.detection
    assert r1.detection is None  # rank 1 ended on rank 0's posted verdict


class _FreezableStore(_DictStore):
    """A store whose server can be stopped: calls then wait for ever, as TCPStore's do when the
    process serving it is stopped (its socket stays open; the client's timeout does not cover it)."""

    def __init__(self):
        super().__init__()
        self.running = threading.Event()
        self.running.set()

    def set(self, k, v):
        self.running.wait()
        super().set(k, v)

    def get(self, k):
        self.running.wait()
        return super().get(k)

    def check(self, keys):
        self.running.wait()
        return super().check(keys)


def test_a_frozen_store_neither_blocks_the_watchdog_nor_hides_the_silent_rank(tmp_path):
    """Rank 0 freezes (its heartbeats stop) and so does the store it serves: rank 1's watchdog
    still finds the hang on time and names rank 0, from the heartbeat files."""
    from longtrain.parallel.watchdog import CollectiveWatchdog

    store = _FreezableStore()
    r0 = CollectiveWatchdog(0, 2, timeout_s=1.0, store=store, interval=0.05, exit_on_hang=False)
    r1 = CollectiveWatchdog(1, 2, timeout_s=1.0, store=store, interval=0.05, exit_on_hang=False)
    r0.step = r1.step = 5
    r0.heartbeat_dir = r1.heartbeat_dir = tmp_path  # what share_heartbeats sets, without its thread
    frozen_in = r0.watch("forward_backward")
    frozen_in.__enter__()  # frozen inside its forward, never to leave it (kept referenced till the end)
    r0._publish()  # its last heartbeat; no thread beats for it after this
    r1.start()
    store.running.clear()  # the store freezes with rank 0
    try:
        with r1.watch("all_reduce(dp_sp)"):
            t0 = time.monotonic()
            while r1.verdict is None and time.monotonic() - t0 < 10:
                time.sleep(0.05)
    finally:
        r1.stop()
        store.running.set()
    del frozen_in
    assert r1.verdict is not None, "rank 1's watchdog blocked on the frozen store"
    assert re.search(r"rank 0 stuck in forward_backward at step 5 for [0-9.]+ s \(no heartbeat for", r1.verdict), \
        r1.verdict
    assert "which rank 0 serves, has not answered" in r1.verdict and "rank 1 stuck" not in r1.verdict, r1.verdict
    assert 0.9 <= r1.detection["after_s"] <= 0.9 + 0.05 + DETECT_SLACK_S, r1.detection
