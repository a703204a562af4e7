"""``launch.backend=slurm``: write the sbatch script, submit it (or print it: ``--dry-run``).

Owns: ``sbatch_script(cfg, config, overrides)`` and ``launch_slurm``. The job is
``launch.nodes`` nodes x ``launch.nproc_per_node`` tasks, one ``srun`` task per GPU (or per CPU
slot); each task runs ``python -m longtrain.launch.worker``, which maps SLURM_PROCID & co. to
torchrun's variables (``longtrain.launch.env``). MASTER_ADDR is the job's first host
(``scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1``); the port follows from the job id,
so multi-node rendezvous needs nothing but the Slurm environment.

Preemption and time limits -- which signal form reaches the Python workers:

- ``--signal=USR1@N`` (no ``B:``) makes Slurm signal the processes of every job *step* -- the
  workers -- but not the batch shell, so nobody would be left to requeue the job after they stop.
- ``--signal=B:USR1@N`` signals only the batch shell. We use this one: the script traps USR1 and
  forwards it to ``srun`` (``kill -USR1 $srun_pid``; srun relays USR1 to every task), the workers
  agree on a step, save a checkpoint and exit with code 85 (``EXIT_CODE_CHECKPOINTED``), and only
  *then* the script runs ``scontrol requeue $SLURM_JOB_ID``: requeueing earlier would kill the
  workers in the middle of writing. ``scancel --signal=USR1 --batch JOBID`` triggers the same path
  by hand. For bash to run a trap while waiting, ``srun`` runs in the background and the script
  ``wait``s for it (a foreground command would defer the trap until it ends).

A requeued job runs the same script again with SLURM_RESTART_COUNT set; the workers resume from
the newest complete checkpoint (``checkpoint.resume: auto``). A worker failure (not a signal)
restarts ``srun`` inside the same allocation up to ``launch.max_restarts`` times.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from longtrain.config import Config, ConfigError
from longtrain.errors import EXIT_CODE_USER_ERROR
from longtrain.launch.local import worker_command
from longtrain.trainer.run import make_run_dir
from longtrain.trainer.signals import EXIT_CODE_CHECKPOINTED


def _dq(path) -> str:
    """A path for an #SBATCH line: sbatch reads a double-quoted argument as one (shell quoting does not apply)."""
    text = str(path)
    if '"' in text:
        raise ConfigError(f"the path {text!r} holds a double quote, which an #SBATCH line cannot carry; "
                          f"rename it or set logging.run_dir / launch.slurm.output elsewhere.")
    return f'"{text}"'


def _sbatch_lines(cfg: Config) -> list[str]:
    lc, sc = cfg.launch, cfg.launch.slurm
    if not re.fullmatch(r"(\d+-)?\d+(:\d{1,2}){0,2}", sc.time):
        raise ConfigError(f"launch.slurm.time={sc.time!r} is not a Slurm time; use HH:MM:SS, MM or D-HH:MM:SS.")
    run_dir = cfg.run_dir.resolve()
    # paths in double quotes (sbatch strips them): a run directory may hold a space
    lines = [f"--job-name={sc.job_name}", f"--nodes={lc.nodes}", f"--ntasks-per-node={lc.nproc_per_node}",
             f"--cpus-per-task={sc.cpus_per_task}", f"--time={sc.time}",
             f"--output={_dq(sc.output or run_dir / 'slurm-%j.out')}", "--open-mode=append",  # requeues append
             f"--chdir={_dq(Path.cwd())}"]
    if sc.gpus_per_node:
        lines.append(f"--gpus-per-node={sc.gpus_per_node}")
    for flag, value in (("partition", sc.partition), ("account", sc.account), ("qos", sc.qos), ("mem", sc.mem)):
        if value:
            lines.append(f"--{flag}={value}")
    if sc.requeue:
        lines.append("--requeue")
    if sc.signal_seconds:
        lines.append(f"--signal=B:USR1@{sc.signal_seconds}")
    for extra in sc.extra_sbatch:
        extra = str(extra).strip()
        lines.append(extra.removeprefix("#SBATCH").strip())
    return lines


def sbatch_script(cfg: Config, config: str | None, overrides: list[str]) -> str:
    """The batch script for this config; ``config`` and ``overrides`` go to every worker unchanged."""
    lc, sc = cfg.launch, cfg.launch.slurm
    if sc.gpus_per_node and sc.gpus_per_node != lc.nproc_per_node:
        raise ConfigError(f"launch.slurm.gpus_per_node={sc.gpus_per_node} but launch.nproc_per_node="
                          f"{lc.nproc_per_node}: the job runs one task per GPU; set them equal.")
    python = sc.python or sys.executable
    cmd = " ".join(shlex.quote(a) for a in [python, *worker_command(config, overrides)])
    env_lines = []
    if os.environ.get("PYTHONPATH"):  # a source checkout: the workers import the same longtrain
        env_lines.append(f"export PYTHONPATH={shlex.quote(os.environ['PYTHONPATH'])}")
    setup = "\n".join(str(s) for s in sc.setup)
    sbatch = "\n".join(f"#SBATCH {line}" for line in _sbatch_lines(cfg))
    requeue = "1" if sc.requeue else "0"
    launch_dir = cfg.run_dir.resolve() / "launch"
    return f"""#!/bin/bash
# Written by `longtrain launch` (launch.backend=slurm). Resubmit with: sbatch {shlex.quote(str(launch_dir / 'sbatch.sh'))}
{sbatch}
set -u
{chr(10).join(env_lines)}
{setup}
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-${{SLURM_CPUS_PER_TASK:-1}}}}
MAX_RESTARTS={lc.max_restarts}
REQUEUE={requeue}
# planned exits the workers note here (longtrain.launch.worker): exit-85 (checkpointed on request;
# the worker exits 0, so srun --kill-on-bad-exit does not kill ranks still finishing) and exit-2
# (a bad setting, file or checkpoint: restarting cannot fix it)
NOTES={shlex.quote(str(launch_dir))}/exit-notes-"$SLURM_JOB_ID"
echo "[longtrain] job $SLURM_JOB_ID on $SLURM_JOB_NODELIST (restart ${{SLURM_RESTART_COUNT:-0}}), master $MASTER_ADDR, $(date -Is)"

# USR1 (--signal=B:USR1@N near the time limit, preemption, or `scancel --signal=USR1 --batch`):
# forward it to srun, which relays it to every worker; they checkpoint and exit with code 85.
preempted=0
srun_pid=
on_usr1() {{
  preempted=1
  echo "[longtrain] job $SLURM_JOB_ID: USR1 -> asking the workers to checkpoint and stop"
  [ -n "$srun_pid" ] && kill -USR1 "$srun_pid" 2>/dev/null
}}
trap on_usr1 USR1

attempt=0
while :; do
  rm -rf "$NOTES" && mkdir -p "$NOTES"
  LONGTRAIN_EXIT_NOTES="$NOTES" LONGTRAIN_ATTEMPT=$attempt srun --label --kill-on-bad-exit=1 --ntasks-per-node={lc.nproc_per_node} {cmd} &
  srun_pid=$!
  while :; do  # `wait` returns early when a trapped signal arrives; wait again until srun is gone
    wait "$srun_pid"; rc=$?
    kill -0 "$srun_pid" 2>/dev/null || break
  done
  srun_pid=
  if [ -e "$NOTES/exit-{EXIT_CODE_USER_ERROR}" ]; then
    echo "[longtrain] job $SLURM_JOB_ID: a worker stopped on an error no restart can fix (its line is above); not restarting" >&2
    exit {EXIT_CODE_USER_ERROR}
  fi
  if [ "$rc" = 0 ] && [ -e "$NOTES/exit-{EXIT_CODE_CHECKPOINTED}" ]; then rc={EXIT_CODE_CHECKPOINTED}; fi
  if [ "$preempted" = 1 ] || [ "$rc" = {EXIT_CODE_CHECKPOINTED} ]; then
    if [ "$REQUEUE" = 1 ]; then
      echo "[longtrain] job $SLURM_JOB_ID: workers stopped (exit $rc); requeueing, the next run resumes from the checkpoint"
      scontrol requeue "$SLURM_JOB_ID"
      sleep 5  # scontrol requeue ends this script; do not report a result before it does
    fi
    exit "$rc"
  fi
  if [ "$rc" = 0 ]; then
    echo "[longtrain] job $SLURM_JOB_ID: finished, $(date -Is)"
    exit 0
  fi
  if [ "$attempt" -ge "$MAX_RESTARTS" ]; then
    echo "[longtrain] job $SLURM_JOB_ID: workers failed (exit $rc) after $attempt restart(s); giving up" >&2
    exit "$rc"
  fi
  attempt=$((attempt + 1))
  echo "[longtrain] job $SLURM_JOB_ID: workers failed (exit $rc); restart $attempt of $MAX_RESTARTS from the newest checkpoint" >&2
done
"""


def job_state(job_id: str) -> dict:
    """``scontrol show job`` as a dict (JobState, RestartCnt, ExitCode, ...); {} once Slurm forgot it."""
    r = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    if r.returncode != 0:
        return {}
    return dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv)


def wait_for_job(job_id: str, poll_s: float = 2.0) -> int:
    """Block until the job ends for good (a requeue is not an end); 0 when it completed."""
    last = None
    while True:
        info = job_state(job_id)
        state = info.get("JobState", "UNKNOWN")
        if state != last:
            print(f"[longtrain] slurm job {job_id}: {state} (restarts {info.get('Restarts', '0')})", flush=True)
            last = state
        if not info or state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                                 "BOOT_FAIL", "DEADLINE"):
            return 0 if state == "COMPLETED" else 1
        time.sleep(poll_s)


def launch_slurm(cfg: Config, config: str | None, overrides: list[str], dry_run: bool = False,
                 wait: bool = False) -> int:
    script = sbatch_script(cfg, config, overrides)
    if dry_run:
        print(script, end="")
        return 0
    if not shutil.which("sbatch"):
        print("longtrain launch: sbatch not found on PATH; run on a Slurm login node, or see "
              "`longtrain launch ... --dry-run` for the script (single-node test Slurm: "
              "bash launch/slurm_setup.sh).", file=sys.stderr)
        return 1
    path = cfg.run_dir.resolve() / "launch" / "sbatch.sh"
    make_run_dir(path.parent)
    path.write_text(script)
    r = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        print(f"longtrain launch: sbatch failed: {r.stderr.strip()}", file=sys.stderr)
        return 1
    job_id = r.stdout.strip().split(";")[0]
    out = cfg.launch.slurm.output or str(cfg.run_dir.resolve() / "slurm-%j.out")
    print(f"[longtrain] submitted slurm job {job_id}: script {path}, log {out.replace('%j', job_id)}", flush=True)
    return wait_for_job(job_id) if wait else 0
