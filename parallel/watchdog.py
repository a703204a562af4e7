"""A watchdog that turns a hung collective into an error naming the stuck rank and operation.

Owns: ``CollectiveWatchdog``. The trainer marks its collectives and the stretches of a step that
contain collectives (``with dims.watch("all_reduce(dp_sp)"):``); a daemon thread per rank
publishes, every ``interval`` seconds, what its rank is doing -- step, innermost marked operation,
how many operations it has entered so far, where its main thread is -- through two channels: the
job's c10d store (the TCP key-value store every launcher already starts; no collective is used,
so a hung group cannot hang the watchdog too) and, once the trainer has its run directory
(``share_heartbeats``), a file per rank in ``<run_dir>/heartbeat/``.

The store is served by rank 0's process, so a stopped or frozen rank 0 (SIGSTOP, a debugger, a
swapped-out host) freezes it too: its socket stays open and a read waits for ever, whatever
timeout the client was given. Hence every store call of the watchdog and of its diagnosis is
bounded (``_StoreLink``: at most ``interval`` seconds, then the store counts as silent), and the
heartbeat files are the second channel that does not go through rank 0 (the run directory is
shared by every node that writes checkpoints into it). A rank's record is the freshest of the two.

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
``detection`` too), posts the verdict (store and file) so every rank's watchdog ends its process
too, and exits with ``EXIT_CODE_HUNG``: the launcher then stops the job (or restarts it, with
``launch.max_restarts``) instead of waiting for ever. If the backend's timeout fires first after
all, ``watch`` ends the process the same way, with the same one-line diagnosis. Cost on the
training path: a list append and a ``time.monotonic()`` per marked operation; off it, one small
store write and one small file write per rank per interval (at most 5 s).

With NCCL, collectives are enqueued asynchronously and the wait happens at the next host sync;
the trainer marks that sync (``sync(loss, grad_norm)``) so a hang is still attributed to a step.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable, Optional

import torch.distributed as dist
from torch.distributed.distributed_c10d import _get_default_store

EXIT_CODE_HUNG = 86  # a process ended by the watchdog; launchers treat it as a failure
_KEY = "longtrain/watchdog/"


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within ``parallel.timeout_s``; the message names who is stuck."""


class _StoreSilent(Exception):
    """The store did not answer within the link's limit (or answered with an error)."""


class _StoreLink:
    """The watchdog's calls to the job's store, each one waited for at most ``limit`` seconds.

    The calls run one at a time on a daemon thread of their own; while one is unanswered (its
    server is stopped), the next ones fail at once instead of queueing behind it, and the link
    is back when the server answers again. (Not a ``concurrent.futures`` pool: its threads are
    joined at interpreter exit, so one blocked on a stopped store would hang the process's exit.)
    """

    def __init__(self, store, limit: float):
        self.store, self.limit = store, limit
        self.last_ok = time.time()  # when the last call that was answered was issued
        self._lock = threading.Lock()
        self._pending: Optional[threading.Event] = None
        self._jobs: "queue.Queue" = queue.Queue()
        threading.Thread(target=self._serve, name="longtrain-watchdog-store", daemon=True).start()

    def close(self) -> None:
        self._jobs.put(None)  # the thread ends after the call it may still be waiting in

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, issued, box, done = job
            try:
                box.append((True, fn(self.store)))
                self.last_ok = max(self.last_ok, issued)
            except Exception as e:  # noqa: BLE001 - the store's host is gone: the caller sees it as silence
                box.append((False, e))
            done.set()

    def call(self, fn: Callable):
        """``fn(store)``, or ``_StoreSilent`` when the store does not answer in time."""
        with self._lock:
            if self._pending is not None and not self._pending.is_set():
                raise _StoreSilent("an earlier call is still unanswered")
            box: list = []
            self._pending = done = threading.Event()
            self._jobs.put((fn, time.time(), box, done))
            if not done.wait(self.limit):
                raise _StoreSilent(f"no answer within {self.limit:g} s")
            ok, value = box[0]
            if not ok:
                raise _StoreSilent(f"{type(value).__name__}: {value}")
            return value

    def silent_for(self) -> float:
        return time.time() - self.last_ok


class CollectiveWatchdog:
    def __init__(self, rank: int, world_size: int, timeout_s: float, store=None,
                 interval: Optional[float] = None, exit_on_hang: bool = True):
        self.rank, self.world_size, self.timeout_s = rank, world_size, float(timeout_s)
        self.deadline = 0.9 * self.timeout_s
        self.interval = interval if interval is not None else min(5.0, max(0.2, self.timeout_s / 20))
        self.link = _StoreLink(store, limit=max(0.1, self.interval)) if store is not None else None
        self.heartbeat_dir: Optional[Path] = None  # share_heartbeats
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
        self._started = time.time()
        self._abort_lock = threading.Lock()
        self.verdict: Optional[str] = None
        # when this rank's watchdog found a hang: {"op", "after_s" (time in op), "deadline_s", "at" (unix time)}
        self.detection: Optional[dict] = None
        self._warned = -1

    @property
    def stale_after(self) -> float:
        """A record older than this is a silent rank's (frozen or dead)."""
        return max(self.deadline, 3 * self.interval)

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
            if isinstance(e, CollectiveTimeout) or time.monotonic() - t0 < 0.8 * self.timeout_s:
                raise
            raise CollectiveTimeout(self._conclude(op, t0)) from e  # (the process ends there when exit_on_hang)
        finally:
            self._stack.pop()
            self._last_op = op
            self._progress = time.monotonic()

    # ---------------------------------------------------------------- the watchdog thread

    def start(self) -> "CollectiveWatchdog":
        if (self.link is not None or self.heartbeat_dir is not None) and self._thread is None:
            self._publish()
            self._thread = threading.Thread(target=self._run, name=f"longtrain-watchdog-{self.rank}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * self.interval + 1)
        self._thread = None
        if self.link is not None:
            self.link.close()
        if self.heartbeat_dir is not None:  # a rank that stopped on purpose is not a frozen one
            with contextlib.suppress(OSError):
                self._file(f"rank-{self.rank}.json").unlink()

    def share_heartbeats(self, directory: os.PathLike) -> None:
        """Also publish heartbeats (and a verdict) as files in ``directory`` -- the run's
        ``heartbeat/``, which every rank of the job can read -- and read the other ranks' there."""
        try:
            Path(directory).mkdir(parents=True, exist_ok=True)
        except OSError:  # an unwritable run directory: the store alone carries the heartbeats
            return
        self.heartbeat_dir = Path(directory)
        if self._thread is None and not self._stop.is_set():
            self.start()

    def _record(self) -> dict:
        now = time.monotonic()
        stack = list(self._stack)
        op, since = stack[-1] if stack else (None, self._progress)
        return {"rank": self.rank, "step": self.step, "seq": self._seq, "op": op, "last_op": self._last_op,
                "for_s": round(now - since, 3), "idle_s": round(now - self._progress, 3),
                "where": self._where(), "beat": time.time(), "pid": os.getpid(), "host": socket.gethostname()}

    def _where(self) -> str:
        """The innermost frames of the main thread (what it is doing right now)."""
        frame = sys._current_frames().get(self._main)
        parts = []
        while frame is not None and len(parts) < 2:
            code = frame.f_code
            parts.append(f"{os.path.basename(code.co_filename)}:{frame.f_lineno} {code.co_name}")
            frame = frame.f_back
        return " <- ".join(parts)

    def _file(self, name: str) -> Path:
        return self.heartbeat_dir / name

    def _publish(self) -> None:
        text = json.dumps(self._record())
        if self.heartbeat_dir is not None:
            try:
                _write_replace(self._file(f"rank-{self.rank}.json"), text)
            except OSError:
                pass  # the store still carries it; a full disk is reported by the checkpointer
        if self.link is not None:
            with contextlib.suppress(_StoreSilent):
                self.link.call(lambda s: s.set(f"{_KEY}{self.rank}", text))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._publish()
            verdict = self._posted_verdict()
            if verdict is not None:  # another rank found the hang: end this process too
                self._abort(verdict, posted=True)
                return
            top = self._stack[-1:]  # one read: the training thread pushes and pops meanwhile
            op, since = top[0] if top else (None, 0.0)
            if op is not None and time.monotonic() - since >= self.deadline:
                if self._hung():
                    self._conclude(op, since)
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
        now = time.time()
        return any(rec is None or rec["seq"] < mine["seq"] or now - rec["beat"] > self.stale_after
                   for r, rec in self._records().items() if r != self.rank)

    def _posted_verdict(self) -> Optional[str]:
        if self.link is not None:
            try:
                if self.link.call(lambda s: s.check([f"{_KEY}verdict"])):
                    return self.link.call(lambda s: s.get(f"{_KEY}verdict")).decode()
            except _StoreSilent:
                pass
        if self.heartbeat_dir is not None:
            try:
                posted = json.loads(self._file("verdict.json").read_text())
            except (OSError, ValueError):
                return None
            if posted.get("at", 0.0) >= self._started - 1.0:  # not a verdict of an earlier attempt of the job
                return str(posted.get("verdict"))
        return None

    def _conclude(self, op: str, since: float) -> str:
        """This rank found the hang: diagnose it, tell every rank, end this process (``exit_on_hang``)."""
        with self._abort_lock:
            if self.verdict is None:
                self.detection = {"op": op, "after_s": time.monotonic() - since, "deadline_s": self.deadline,
                                  "at": time.time()}
        return self._abort(self.diagnose(), posted=False)

    def _abort(self, verdict: str, posted: bool) -> str:
        with self._abort_lock:  # the watchdog thread and the training thread may both get here
            first = self.verdict is None
            if first:
                self.verdict = verdict
        if not first:
            if self.exit_on_hang:  # the other thread is ending the process: wait for it
                while True:
                    time.sleep(1.0)
            return self.verdict
        who = "another rank's watchdog" if posted else "watchdog"
        found = "" if self.detection is None else (
            f"; detected after {self.detection['after_s']:.2f} s in {self.detection['op']} (deadline "
            f"{self.detection['deadline_s']:.2f} s) at unix time {self.detection['at']:.3f}")
        print(f"[longtrain] rank {self.rank}: {who}: {verdict}{found}; exiting with code {EXIT_CODE_HUNG}",
              file=sys.stderr, flush=True)
        if not posted:  # tell every rank (the stuck one too), and give their watchdogs time to read it
            if self.heartbeat_dir is not None:  # before this process (maybe the store's host) ends
                with contextlib.suppress(OSError):
                    _write_replace(self._file("verdict.json"), json.dumps({"verdict": verdict, "at": time.time()}))
            if self.link is not None:
                with contextlib.suppress(_StoreSilent):
                    self.link.call(lambda s: s.set(f"{_KEY}verdict", verdict))
            if self.link is not None or self.heartbeat_dir is not None:
                time.sleep(2 * self.interval + 0.5)
        if self.exit_on_hang:
            os._exit(EXIT_CODE_HUNG)
        return verdict

    # ---------------------------------------------------------------- the diagnosis

    def _records(self) -> dict[int, Optional[dict]]:
        """Every rank's freshest record from the store and the heartbeat files; None for a rank
        neither channel has heard from. Without files and with the store silent, only rank 0 (the
        store's host) is known to be silent; the other ranks are left out (nothing is known)."""
        store_up = True
        out: dict[int, Optional[dict]] = {}
        for r in range(self.world_size):
            if r == self.rank:
                out[r] = self._record()
                continue
            found = []
            if self.link is not None and store_up:
                try:
                    key = f"{_KEY}{r}"
                    if self.link.call(lambda s: s.check([key])):
                        found.append(json.loads(self.link.call(lambda s: s.get(key))))
                except _StoreSilent:
                    store_up = False
                except ValueError:
                    pass
            if self.heartbeat_dir is not None:
                with contextlib.suppress(OSError, ValueError):
                    found.append(json.loads(self._file(f"rank-{r}.json").read_text()))
            if found:
                out[r] = max(found, key=lambda rec: rec["beat"])
            elif r == 0 or self.heartbeat_dir is not None or store_up:
                out[r] = None
        return out

    def diagnose(self) -> str:
        """One line: which rank is stuck in what at which step for how long, and who waits for it."""
        mine = self._record()
        head = f"collective watchdog (parallel.timeout_s={self.timeout_s:g})"
        if self.link is None and self.heartbeat_dir is None:
            return (f"{head}: rank {self.rank} stuck in {mine['op']} at step {mine['step']} for "
                    f"{mine['for_s']:.1f} s (no store to ask the other ranks)")
        recs = self._records()
        now = time.time()
        silent = {r: rec for r, rec in recs.items() if rec is None or now - rec["beat"] > self.stale_after}
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
        if 0 in silent and self.link is not None and self.link.silent_for() > self.interval:
            parts.append(f"the job's store, which rank 0 serves, has not answered for {self.link.silent_for():.1f} s")
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


def silent_ranks(heartbeat_dir: os.PathLike, older_than: float) -> list[dict]:
    """The records in ``heartbeat_dir`` whose last heartbeat is more than ``older_than`` seconds
    old, from ranks on this host: what a launcher reads to find a stopped or frozen worker (the
    rank's own watchdog thread cannot beat). A rank that ended on purpose removed its file."""
    out, now, host = [], time.time(), socket.gethostname()
    for path in Path(heartbeat_dir).glob("rank-*.json"):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if rec.get("host") == host and now - rec.get("beat", now) > older_than:
            out.append(rec)
    return sorted(out, key=lambda rec: rec["rank"])


def _write_replace(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so a reader sees the old or the new content, never a part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


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
