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

Preemption: the Checkpointer (installed by ``train``) turns SIGUSR1 or SIGTERM into "save at the
next step all ranks agree on, then exit with code 85"; the launcher (the Slurm batch script)
then requeues the job. The exit code passes through this entry point unchanged -- except where
the launcher sets LONGTRAIN_EXIT_NOTES: there the worker notes a planned exit (85, or the user
error code 2) as a file ``exit-<code>`` in that directory and exits 0 for 85, because the Slurm
script's ``srun --kill-on-bad-exit`` would take a planned 85 of one rank for a failure and kill
the ranks still finishing; the script reads the notes instead.

User errors (``longtrain.errors``: a bad setting, file or checkpoint) end the worker with one
line on stderr and ``EXIT_CODE_USER_ERROR``, which no launcher restarts.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional

from longtrain.cli_common import split_config_args
from longtrain.config import Config, ConfigError, load_config
from longtrain.errors import EXIT_CODE_USER_ERROR, UserError, report_user_error
from longtrain.launch.env import WorkerEnv, normalize_env
from longtrain.trainer.signals import EXIT_CODE_CHECKPOINTED

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


def run_worker(config: Optional[str], overrides: list[str]) -> dict:
    """Normalise the environment, load the config, train; return the training function's result."""
    wenv = normalize_env()
    cfg = load_worker_config(config, overrides, wenv)
    print(f"[longtrain] worker {wenv.describe()}", flush=True)  # every rank: the log names each one's host
    result = resolve_entry(cfg.launch.entry)(cfg) or {}
    return result


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    config, overrides = split_config_args(argv)
    notes = os.environ.get("LONGTRAIN_EXIT_NOTES")
    try:
        result = run_worker(config, overrides)
    except UserError as e:  # exit code 2: the launchers do not restart what cannot succeed
        if notes:
            Path(notes, f"exit-{EXIT_CODE_USER_ERROR}").touch()
        return report_user_error(e)
    except SystemExit as e:
        if notes and e.code == EXIT_CODE_CHECKPOINTED:
            Path(notes, f"exit-{EXIT_CODE_CHECKPOINTED}").touch()
            return 0
        raise
    if os.environ.get("RANK", "0") == "0":
        print(RESULT_PREFIX + json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
