"""The one worker entry point of every backend: ``python -m longtrain.launch.worker CONFIG overrides``.

Owns: turning whatever environment a backend gives a process into torchrun's variables
(``longtrain.launch.env``), loading the config, and calling the training function
(``launch.entry``, by default ``longtrain.trainer.train:train``) with it. The local backend runs
it as a subprocess per rank, Slurm's ``srun`` runs it as a task per GPU (or CPU slot), and the Ray
actors call ``run_worker`` in their own process. No backend-specific code reaches the trainer.

Restarts: every backend restarts the same command after a failure or a requeue, and the
Checkpointer resumes from the newest complete checkpoint (``checkpoint.resume: auto``). A
restarted worker that was told ``checkpoint.resume=none`` is switched to ``auto``: starting a
restarted job from scratch would silently throw its progress away.

Preemption: SIGUSR1 asks the workers to write a checkpoint at the next step and stop (see
``_install_preemption_handler``); the launcher (the Slurm batch script) then requeues the job.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
from typing import Callable, Optional

from longtrain.cli import split_config_args
from longtrain.config import Config, ConfigError, load_config
from longtrain.launch.env import WorkerEnv, normalize_env

RESULT_PREFIX = "[longtrain] result: "


def resolve_entry(spec: str) -> Callable[[Config], dict]:
    """``package.module:function`` -> the function (``launch.entry``)."""
    mod_name, _, fn_name = spec.partition(":")
    if not mod_name or not fn_name:
        raise ConfigError(f"launch.entry={spec!r} must look like package.module:function, "
                          f"e.g. longtrain.trainer.train:train.")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"launch.entry={spec!r} cannot be imported ({e}); check the module path and "
                          f"that it is importable on the worker (PYTHONPATH).") from e
    return fn


def load_worker_config(config: Optional[str], overrides: list[str], wenv: WorkerEnv) -> Config:
    cfg = load_config(config, overrides)
    if wenv.restart_count > 0 and cfg.checkpoint.resume == "none":
        if wenv.rank == 0:
            print(f"[longtrain] restart {wenv.restart_count}: checkpoint.resume=none -> auto, so the job "
                  f"continues from its newest checkpoint", flush=True)
        cfg.checkpoint.resume = "auto"
    return cfg


def _install_preemption_handler() -> None:
    """SIGUSR1 -> the Checkpointer saves at the next step boundary and the loop stops.

    The flag is set from the signal handler and agreed on by all ranks inside the Checkpointer
    (a rank that got the signal one step later must still save at the same step), so the handler
    itself only records the request.
    """
    def on_usr1(signum, frame):  # noqa: ARG001 - signal handler signature
        from longtrain.trainer import checkpoint

        checkpoint.request_save(stop=True)
        print(f"[longtrain] rank {os.environ.get('RANK', '?')}: SIGUSR1 -> checkpoint and stop", flush=True)

    signal.signal(signal.SIGUSR1, on_usr1)


def run_worker(config: Optional[str], overrides: list[str], handle_preemption: bool = True) -> dict:
    """Normalise the environment, load the config, train; return the training function's result."""
    wenv = normalize_env()
    if handle_preemption:
        _install_preemption_handler()
    cfg = load_worker_config(config, overrides, wenv)
    if wenv.rank == 0:
        print(f"[longtrain] worker {wenv.describe()}", flush=True)
    result = resolve_entry(cfg.launch.entry)(cfg) or {}
    return result


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    config, overrides = split_config_args(argv)
    try:
        result = run_worker(config, overrides)
    except ConfigError as e:
        print(f"longtrain: config error: {e}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":
        print(RESULT_PREFIX + json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
