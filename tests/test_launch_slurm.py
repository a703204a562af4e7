"""The Slurm backend on the real single-node Slurm (``bash launch/slurm_setup.sh``): a 2-task job
through ``longtrain launch``, and a job that gets USR1, checkpoints, requeues itself and ends at
the same loss as the undisturbed run. Skipped when ``sinfo`` is missing or does not answer."""

from __future__ import annotations

import re
import shutil
import subprocess
import time

import pytest

from test_launch_common import (STEPS, final_loss, latest_checkpoint_step, longtrain_cmd, metrics_steps,
                                reference_run, run_launch, tiny_overrides, wait_for, worker_env)

__all__ = ["reference_run"]


def _slurm_answers() -> str:
    if not shutil.which("sinfo"):
        return "sinfo is not installed (run: bash launch/slurm_setup.sh)"
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "sinfo does not answer within 10 s (is slurmctld running? bash launch/slurm_setup.sh)"
    states = r.stdout.split()
    if r.returncode != 0 or not any(s.startswith(("idle", "mix", "alloc")) for s in states):
        return f"Slurm is not usable: sinfo -> {r.returncode} {r.stdout.strip()} {r.stderr.strip()}"
    return ""


pytestmark = pytest.mark.skipif(bool(_slurm_answers()), reason=_slurm_answers() or "Slurm is available")

SLURM = ["launch.backend=slurm", "launch.nproc_per_node=2", "launch.slurm.time=10"]


def _job(job_id: str) -> dict:
    from longtrain.launch.slurm import job_state

    return job_state(job_id)


def test_slurm_two_task_job_through_longtrain_launch_into_a_run_dir_with_a_space(tmp_path, reference_run):
    run_dir = tmp_path / "run dir"  # sbatch takes an unquoted #SBATCH path with a space for two arguments
    r = run_launch(*SLURM, *tiny_overrides(run_dir), "--wait", timeout=240)
    job_id = re.search(r"submitted slurm job (\d+)", r.stdout).group(1)
    assert f"slurm job {job_id}: COMPLETED" in r.stdout
    log = (run_dir / f"slurm-{job_id}.out").read_text()
    assert "0: [longtrain] worker rank 0/2" in log and "1: " in log  # two srun tasks, rank-labelled
    assert "from slurm env" in log
    assert final_loss(run_dir) == reference_run


def test_slurm_worker_config_error_is_not_restarted(tmp_path):
    r = subprocess.run(longtrain_cmd("launch", *SLURM, *tiny_overrides(tmp_path), "launch.max_restarts=2",
                                     "parallel.tp=3", "--wait"), env=worker_env(), capture_output=True, text=True,
                       timeout=240)
    job_id = re.search(r"submitted slurm job (\d+)", r.stdout).group(1)
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert r.returncode == 1 and f"slurm job {job_id}: FAILED" in r.stdout, r.stdout[-2000:] + log[-3000:]
    assert "longtrain: config error: world size 2 is not divisible" in log, log[-3000:]
    assert "no restart can fix" in log and "restart 1 of" not in log, log[-3000:]


def test_slurm_usr1_checkpoints_requeues_and_matches_the_undisturbed_loss(tmp_path, reference_run):
    r = run_launch(*SLURM, *tiny_overrides(tmp_path), timeout=60)
    job_id = re.search(r"submitted slurm job (\d+)", r.stdout).group(1)
    try:
        wait_for(lambda: latest_checkpoint_step(tmp_path) > 0, 180, "the first checkpoint")
        assert max(metrics_steps(tmp_path)) < STEPS, "the run finished before the signal; make it longer"
        # what --signal=B:USR1@N does near the time limit, now: USR1 to the batch shell
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
        wait_for(lambda: int(_job(job_id).get("Restarts", 0)) >= 1 and _job(job_id).get("JobState") == "PENDING",
                 120, "the job to requeue itself")
        # a requeued job waits ~2 min (BeginTime); let it start now -- but not within the second of
        # the requeue, or slurmd refuses the new start ("Job credential revoked")
        time.sleep(2)
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
        wait_for(lambda: _job(job_id).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 180,
                 "the requeued job to finish", interval=0.5)
    finally:
        if _job(job_id).get("JobState") in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING"):
            subprocess.run(["scancel", job_id])
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert _job(job_id)["JobState"] == "COMPLETED", log[-4000:]
    assert "USR1 -> asking the workers to checkpoint" in log and "requeueing" in log, log[-4000:]
    assert "exiting with code 85" in log, log[-4000:]
    # the planned exit is noted, not returned: srun --kill-on-bad-exit saw no failed task
    assert "Exited with exit code" not in log and "error: task" not in log, log[-4000:]
    assert "(restart 1)" in log and "resumed from" in log, log[-4000:]
    assert final_loss(tmp_path) == reference_run
