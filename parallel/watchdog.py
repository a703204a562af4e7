"""A watchdog that turns a hung collective into an error naming the stuck rank and operation.

Owns: ``CollectiveWatchdog``. The trainer marks its collectives and the stretches of a step that
contain collectives (``with dims.watch("all_reduce(dp_sp)"):``); a daemon thread per rank
publishes, every ``interval`` seconds, what its rank is doing -- step, innermost marked operation,
how many operations it has entered so far, where its main thread is -- to the job's c10d store
(the TCP key-value store every launcher already starts; no collective is used, so a hung group
cannot hang the watchdog too).

When a rank has been inside one operation for ``0.9 * parallel.timeout_s`` -- before the backend's
own timeout, whose message names neither rank nor operation -- and there is evidence of a hang
(its main thread is blocked inside a torch.distributed call, or another rank is behind it or
silent; a step that is merely long is not a hang), its watchdog reads every rank's record and names
the one(s) holding the others up:

- a rank whose record stopped changing (a frozen or dead process): "no heartbeat";
- otherwise the rank(s) that entered fewer operations than the waiters (every rank runs the same
  sequence of collectives, so the one behind never reached the collective the others wait in);
- if nobody is behind, every waiting rank (a deadlock, or a collective the marks do not cover).

It prints ``rank R stuck in <op> at step S for T s`` (plus who waits where) and when it found it
(``detected after W s in <op> (deadline D s) at unix time U``: W is how long this rank had been in
the operation, at least D and at most D plus one poll ``interval`` plus scheduling delay; kept as
``detection`` too), posts the verdict to the store so every rank's watchdog ends its process too,
and exits with ``EXIT_CODE_HUNG``: the launcher then stops the job (or restarts it, with
``launch.max_restarts``) instead of waiting for ever. If the backend's timeout fires first after
all, ``watch`` re-raises it with the same diagnosis. Cost on the training path: a list append and
a ``time.monotonic()`` per marked operation; the store traffic is one small write per rank per
interval (at most 5 s).

With NCCL, collectives are enqueued asynchronously and the wait happens at the next host sync;
the trainer marks that sync (``sync(loss, grad_norm)``) so a hang is still attributed to a step.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from datetime import timedelta
from typing import Callable, Optional

import torch.distributed as dist
from torch.distributed.distributed_c10d import _get_default_store

EXIT_CODE_HUNG = 86  # a process ended by the watchdog; launchers treat it as a failure
_KEY = "longtrain/watchdog/"


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within ``parallel.timeout_s``; the message names who is stuck."""


class CollectiveWatchdog:
    def __init__(self, rank: int, world_size: int, timeout_s: float, store=None,
                 interval: Optional[float] = None, exit_on_hang: bool = True):
        self.rank, self.world_size, self.timeout_s = rank, world_size, float(timeout_s)
        self.deadline = 0.9 * self.timeout_s
        self.interval = interval if interval is not None else min(5.0, max(0.2, self.timeout_s / 20))
        self.store = store
        self.exit_on_hang = exit_on_hang
        self.step = 0
        self.before_op: Optional[Callable[[str], None]] = None  # fault injection (trainer.faults)
        self._stack: list[tuple[str, float]] = []  # marked operations in progress, innermost last
        self._seq = 0
        self._last_op = "start"
        self._progress = time.monotonic()  # last time an operation was entered or left
        self._main = threading.main_thread().ident
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.verdict: Optional[str] = None
        # when this rank's watchdog found a hang: {"op", "after_s" (time in op), "deadline_s", "at" (unix time)}
        self.detection: Optional[dict] = None
        self._warned = -1

    # ---------------------------------------------------------------- the training thread

    @contextlib.contextmanager
    def watch(self, op: str):
        """Mark ``op`` (a collective, or a stretch containing collectives) as in progress."""
        if self.before_op is not None:
            self.before_op(op)
        self._seq += 1
        t0 = time.monotonic()
        self._stack.append((op, t0))
        self._progress = t0
        try:
            yield
        except RuntimeError as e:  # the backend's own timeout fired first: say who held us up
            if time.monotonic() - t0 >= 0.8 * self.timeout_s and not isinstance(e, CollectiveTimeout):
                raise CollectiveTimeout(self.diagnose()) from e
            raise
        finally:
            self._stack.pop()
            self._last_op = op
            self._progress = time.monotonic()

    # ---------------------------------------------------------------- the watchdog thread

    def start(self) -> "CollectiveWatchdog":
        if self.store is not None and self._thread is None:
            self._publish()
            self._thread = threading.Thread(target=self._run, name=f"longtrain-watchdog-{self.rank}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * self.interval + 1)
        self._thread = None

    def _record(self) -> dict:
        now = time.monotonic()
        stack = list(self._stack)
        op, since = stack[-1] if stack else (None, self._progress)
        return {"rank": self.rank, "step": self.step, "seq": self._seq, "op": op, "last_op": self._last_op,
                "for_s": round(now - since, 3), "idle_s": round(now - self._progress, 3),
                "where": self._where(), "beat": time.time()}

    def _where(self) -> str:
        """The innermost frames of the main thread (what it is doing right now)."""
        frame = sys._current_frames().get(self._main)
        parts = []
        while frame is not None and len(parts) < 2:
            code = frame.f_code
            parts.append(f"{os.path.basename(code.co_filename)}:{frame.f_lineno} {code.co_name}")
            frame = frame.f_back
        return " <- ".join(parts)

    def _publish(self) -> None:
        try:
            self.store.set(f"{_KEY}{self.rank}", json.dumps(self._record()))
        except Exception:  # noqa: BLE001 - the store's host is gone (the launcher stops the job);
            self.store = None  # stop talking to it instead of logging a failure every interval

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.store is not None:
                self._publish()
            verdict = self._posted_verdict() if self.store is not None else None
            if verdict is not None:  # another rank found the hang: end this process too
                self._abort(verdict, posted=True)
                return
            top = self._stack[-1:]  # one read: the training thread pushes and pops meanwhile
            op, since = top[0] if top else (None, 0.0)
            if op is not None and time.monotonic() - since >= self.deadline:
                if self._hung():
                    self.detection = {"op": op, "after_s": time.monotonic() - since, "deadline_s": self.deadline,
                                      "at": time.time()}
                    self._abort(self.diagnose(), posted=False)
                    return
                if self._warned != self._seq:  # a long step, not (yet) a hang: say so once per operation
                    self._warned = self._seq
                    rec = self._record()
                    print(f"[longtrain] rank {self.rank}: watchdog: in {rec['op']} at step {rec['step']} for "
                          f"{rec['for_s']:.0f} s, but no rank is behind and none is blocked in a collective call; "
                          f"not treated as a hang", file=sys.stderr, flush=True)

    def _hung(self) -> bool:
        """Evidence of a hang, not just a long operation: this rank is blocked inside a collective
        call, or a rank is behind it (never reached this collective) or silent."""
        mine = self._record()
        if _in_collective(mine["where"]):
            return True
        if self.store is None:
            return False
        now = time.time()
        return any(rec is None or rec["seq"] < mine["seq"] or now - rec["beat"] > max(self.deadline, 3 * self.interval)
                   for r, rec in self._records().items() if r != self.rank)

    def _posted_verdict(self) -> Optional[str]:
        try:
            if self.store.check([f"{_KEY}verdict"]):
                return self.store.get(f"{_KEY}verdict").decode()
        except Exception:  # noqa: BLE001
            pass
        return None

    def _abort(self, verdict: str, posted: bool) -> None:
        self.verdict = verdict
        who = "another rank's watchdog" if posted else "watchdog"
        found = "" if self.detection is None else (
            f"; detected after {self.detection['after_s']:.2f} s in {self.detection['op']} (deadline "
            f"{self.detection['deadline_s']:.2f} s) at unix time {self.detection['at']:.3f}")
        print(f"[longtrain] rank {self.rank}: {who}: {verdict}{found}; exiting with code {EXIT_CODE_HUNG}",
              file=sys.stderr, flush=True)
        if not posted and self.store is not None:
            try:  # tell every rank (the stuck one too), and give their watchdogs time to read it
                self.store.set(f"{_KEY}verdict", verdict)  # before this process (maybe the store's host) ends
                time.sleep(2 * self.interval + 0.5)
            except Exception:  # noqa: BLE001
                pass
        if self.exit_on_hang:
            os._exit(EXIT_CODE_HUNG)

    # ---------------------------------------------------------------- the diagnosis

    def _records(self) -> dict[int, Optional[dict]]:
        out: dict[int, Optional[dict]] = {}
        for r in range(self.world_size):
            if r == self.rank:
                out[r] = self._record()
                continue
            try:
                out[r] = json.loads(self.store.get(f"{_KEY}{r}")) if self.store.check([f"{_KEY}{r}"]) else None
            except Exception:  # noqa: BLE001
                out[r] = None
        return out

    def diagnose(self) -> str:
        """One line: which rank is stuck in what at which step for how long, and who waits for it."""
        mine = self._record()
        head = f"collective watchdog (parallel.timeout_s={self.timeout_s:g})"
        if self.store is None:
            return (f"{head}: rank {self.rank} stuck in {mine['op']} at step {mine['step']} for "
                    f"{mine['for_s']:.1f} s (no store to ask the other ranks)")
        recs = self._records()
        now = time.time()
        silent = {r: rec for r, rec in recs.items() if rec is None or now - rec["beat"] > max(self.deadline, 3 * self.interval)}
        live = {r: rec for r, rec in recs.items() if r not in silent}
        waiters = {r: rec for r, rec in live.items() if rec["op"] is not None and rec["for_s"] >= 0.5 * self.deadline}
        top = max((rec["seq"] for rec in waiters.values()), default=mine["seq"])
        behind = {r: rec for r, rec in live.items() if rec["seq"] < top}
        parts = []
        for r, rec in sorted(silent.items()):
            if rec is None:
                parts.append(f"rank {r} stuck: no heartbeat from it (dead, frozen or never started)")
            else:
                parts.append(f"rank {r} stuck in {rec['op'] or 'code after ' + rec['last_op']} at step "
                             f"{rec['step']} for {now - rec['beat'] + rec['idle_s']:.1f} s (no heartbeat for "
                             f"{now - rec['beat']:.1f} s)")
        awaited = sorted({rec["op"] for rec in waiters.values() if rec["seq"] == top})
        for r, rec in sorted(behind.items()):
            doing = f"in {rec['op']}" if rec["op"] else f"before {' / '.join(awaited) or 'its next collective'}"
            parts.append(f"rank {r} stuck {doing} at step {rec['step']} for {rec['idle_s']:.1f} s: it never "
                         f"reached the collective the others wait in (last finished: {rec['last_op']}; now at "
                         f"{rec['where']})")
        if not parts:  # nobody behind: a rank not blocked inside a collective call holds the others up
            held = {r: rec for r, rec in waiters.items() if not _in_collective(rec["where"])}
            for r, rec in sorted(held.items()):
                parts.append(f"rank {r} stuck in {rec['op']} at step {rec['step']} for {rec['for_s']:.1f} s, "
                             f"outside any collective call (at {rec['where']})")
            behind = held
        if not parts:  # every waiting rank is inside a collective call
            for r, rec in sorted(waiters.items()):
                parts.append(f"rank {r} stuck in {rec['op']} at step {rec['step']} for {rec['for_s']:.1f} s")
            parts.append("no rank is behind the others (a deadlock, a lost message, or a collective "
                         "outside the marked operations)")
        wait = ", ".join(f"rank {r} in {rec['op']} at step {rec['step']} for {rec['for_s']:.1f} s"
                         for r, rec in sorted(waiters.items()) if r not in behind)
        return (f"{head}: " + "; ".join(parts) + (f"; waiting: {wait}" if wait else "")
                + ". Find why that rank stalls (its log, py-spy dump), or raise parallel.timeout_s if the "
                  "operation is just slow")


def _in_collective(where: str) -> bool:
    """Whether a rank's innermost frames are a torch.distributed call (waiting for its peers)."""
    return any(m in where for m in ("distributed_c10d.py", "c10d_logger.py", "_fsdp_collectives.py",
                                    "_functional_collectives.py"))


def default_store(init_timeout_s: float = 30.0):
    """A client of the job's TCP store (MASTER_ADDR:MASTER_PORT) with a short timeout of its own,
    else the default group's store; None when neither is reachable."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if addr and port:
        try:
            return dist.TCPStore(addr, int(port), is_master=False, timeout=timedelta(seconds=init_timeout_s),
                                 wait_for_workers=False)
        except Exception:  # noqa: BLE001 - fall back to the group's own store
            pass
    try:
        return _get_default_store()
    except Exception:  # noqa: BLE001
        return None
