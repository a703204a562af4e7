"""``launch.backend=local``: N worker processes on this machine, through torch elastic.

Owns: ``launch_local(cfg, config, overrides)``. It uses ``torch.distributed.launcher.api``
(the library under ``torchrun``) rather than its own process management, because elastic
already does what a launcher must get right and is easy to get wrong by hand:

- rendezvous: a c10d store on a free local port; every restart is a new rendezvous round, and
  each worker gets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT and
  TORCHELASTIC_RESTART_COUNT, which is all ``longtrain.launch.worker`` reads;
- no orphans: each worker starts in a session of its own and is stopped with ``killpg``
  (SIGTERM, then SIGKILL after a grace period), so its children go too; on Ctrl-C or SIGTERM the
  agent stops every worker before it returns;
- failure: one worker exiting non-zero stops the others and, while ``launch.max_restarts``
  allows, the group starts again (a fresh elastic launch per attempt; LONGTRAIN_ATTEMPT counts
  them); the workers resume from the newest checkpoint by themselves. A worker that exits with
  ``EXIT_CODE_USER_ERROR`` (a bad setting, file or checkpoint) is not restarted: it cannot succeed;
- a stopped or frozen worker (SIGSTOP, a debugger): its collective watchdog thread stops writing
  its heartbeat file (``<run_dir>/heartbeat/``, ``parallel.watchdog``), and once the newest is
  ``parallel.timeout_s`` old the launcher kills it (SIGKILL; SIGTERM waits for a stopped process,
  and elastic would wait 30 s for it), which is a failure like any other. The others' watchdogs
  name it first, and they cannot work around it: it serves the job's store when it is rank 0.
  (Not elastic's own ``FileTimerServer``: after killing a worker it kills its own process too,
  here the launcher, which must stay to report and restart.)
- logs: every line of every worker is streamed with a ``[rank N]`` prefix and kept in
  ``<run_dir>/launch/attempt_<k>/<rank>/stdout.log`` (elastic's layout).

One process per GPU when CUDA is there (``launch.nproc_per_node`` of them), otherwise per CPU
slot; OMP_NUM_THREADS is set so the processes share the cores instead of fighting over them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig as ElasticConfig
from torch.distributed.launcher.api import elastic_launch

from longtrain.config import Config, ConfigError
from longtrain.errors import EXIT_CODE_USER_ERROR
from longtrain.launch.env import free_port
from longtrain.parallel.watchdog import EXIT_CODE_HUNG, silent_ranks
from longtrain.trainer.run import make_run_dir


def worker_command(config: str | None, overrides: list[str]) -> list[str]:
    """The argv after the interpreter that every backend runs per worker."""
    return ["-u", "-m", "longtrain.launch.worker", *([config] if config else []), *overrides]


def launch_local(cfg: Config, config: str | None, overrides: list[str]) -> int:
    lc = cfg.launch
    if lc.nodes != 1:
        raise ConfigError(f"launch.nodes={lc.nodes} with launch.backend=local: the local backend starts "
                          f"workers on this machine only; use launch.backend=slurm or ray for several nodes.")
    nproc = lc.nproc_per_node
    log_dir = make_run_dir(cfg.run_dir / "launch")
    if "OMP_NUM_THREADS" not in os.environ:  # inherited by the workers
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    # Workers must not share the agent's TCPStore: its keys outlive a restart, so a restarted group
    # can read the previous group's addresses and hang in init (pytorch/pytorch#135712). With this,
    # each rendezvous round hands the workers a fresh MASTER_PORT and rank 0 hosts the store.
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    print(f"[longtrain] launch: {nproc} local workers, max_restarts={lc.max_restarts}, logs under {log_dir}",
          flush=True)
    stop_watching = threading.Event()
    threading.Thread(target=_kill_frozen_workers, args=(cfg.run_dir / "heartbeat", cfg.parallel.timeout_s,
                                                        stop_watching), daemon=True).start()
    try:
        return _attempts(lc, nproc, log_dir, config, overrides)
    finally:
        stop_watching.set()


def _attempts(lc, nproc: int, log_dir, config, overrides) -> int:
    """Up to ``1 + launch.max_restarts`` elastic launches; the launcher's exit code."""
    for attempt in range(lc.max_restarts + 1):
        # elastic's own restarts would retry every failure, also one no restart can fix; so each
        # attempt is one elastic launch (max_restarts=0) and this loop decides about the next
        port = lc.master_port or free_port("127.0.0.1")
        ecfg = ElasticConfig(
            min_nodes=1, max_nodes=1, nproc_per_node=nproc,
            run_id=f"longtrain-{uuid.uuid4().hex[:8]}",
            rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{port}", rdzv_configs={"timeout": 300},
            max_restarts=0, monitor_interval=0.2,
            logs_specs=DefaultLogsSpecs(log_dir=str(log_dir), tee=Std.ALL),
            log_line_prefix_template="[rank ${rank}] ",
            start_method="spawn",
        )
        before = os.environ.get("LONGTRAIN_ATTEMPT")
        os.environ["LONGTRAIN_ATTEMPT"] = str(attempt)  # the workers' restart count; set for them only
        try:
            elastic_launch(ecfg, sys.executable)(*worker_command(config, overrides))
        except ChildFailedError as e:
            rank, first = e.get_first_failure()
            why = (f"worker rank {rank}'s collective watchdog ended the job (exit code {EXIT_CODE_HUNG}; its "
                   f"line above names the stuck rank)" if first.exitcode == EXIT_CODE_HUNG else
                   f"worker rank {rank} failed with exit code {first.exitcode}")
            user = next((r for r, f in sorted(e.failures.items()) if f.exitcode == EXIT_CODE_USER_ERROR), None)
            if user is not None:
                print(f"[longtrain] launch: worker rank {user} stopped on an error no restart can fix (exit code "
                      f"{EXIT_CODE_USER_ERROR}, its message is above); not restarting. Its log: "
                      f"{_rank_log(log_dir, user)}", file=sys.stderr, flush=True)
                return EXIT_CODE_USER_ERROR
            if attempt < lc.max_restarts:
                print(f"[longtrain] launch: {why}; restarting "
                      f"the group from the newest checkpoint ({attempt + 1} of {lc.max_restarts})",
                      file=sys.stderr, flush=True)
                continue
            print(f"[longtrain] launch: {why} after "
                  f"{lc.max_restarts} restart(s); every worker was stopped. Its log: {_rank_log(log_dir, rank)}",
                  file=sys.stderr, flush=True)
            return 1
        except SignalException as e:
            print(f"[longtrain] launch: got {e.sigval.name}; every worker was stopped", file=sys.stderr, flush=True)
            return 128 + int(e.sigval)
        except KeyboardInterrupt:
            print("[longtrain] launch: interrupted; every worker was stopped", file=sys.stderr, flush=True)
            return 130
        finally:
            if before is None:
                os.environ.pop("LONGTRAIN_ATTEMPT", None)
            else:
                os.environ["LONGTRAIN_ATTEMPT"] = before
        break
    print("[longtrain] launch: all workers finished", flush=True)
    return 0


def _kill_frozen_workers(heartbeat_dir: Path, timeout_s: float, stop: threading.Event) -> None:
    """SIGKILL a worker of this launcher whose heartbeat is ``timeout_s`` old (see the docstring)."""
    killed: set[int] = set()
    while not stop.wait(min(1.0, timeout_s / 20)):
        for rec in silent_ranks(heartbeat_dir, older_than=timeout_s):
            pid = int(rec.get("pid", -1))
            if pid in killed or _parent_of(pid) != os.getpid():  # a worker of an earlier attempt, or not ours
                continue
            killed.add(pid)
            print(f"[longtrain] launch: rank {rec['rank']} (pid {pid}) sent no heartbeat for "
                  f"{time.time() - rec['beat']:.1f} s (parallel.timeout_s={timeout_s:g}): it is stopped or "
                  f"frozen (last in {rec['op'] or 'code after ' + rec['last_op']} at step {rec['step']}); "
                  f"killing it", file=sys.stderr, flush=True)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def _parent_of(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):  # gone, or no /proc (the check then skips it)
        return -1


def _rank_log(log_dir: Path, rank: int) -> str:
    logs = sorted(log_dir.glob(f"*/attempt_*/{rank}/stdout.log"), key=lambda p: p.stat().st_mtime)
    return str(logs[-1]) if logs else str(log_dir)
