"""The Ray backend on a real local Ray cluster (started by the launcher): a 2-worker gloo job whose
worker is killed mid-run restarts as a group, resumes from the checkpoint and ends at the same
loss as the undisturbed run."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from test_launch_common import (STEPS, cmdline, descendants, final_loss, latest_checkpoint_step, longtrain_cmd,
                                metrics_steps, reference_run, tiny_overrides, wait_for, worker_env)

__all__ = ["reference_run"]

pytest.importorskip("ray", reason="Ray is not installed (pip install 'ray[default]')")


def _actor_pids(launcher_pid: int) -> list[int]:
    return sorted(p for p in descendants(launcher_pid) if cmdline(p).startswith("ray::TrainWorker"))


def test_ray_job_restarts_after_a_killed_worker_and_matches_the_undisturbed_loss(tmp_path, reference_run):
    launcher = subprocess.Popen(
        longtrain_cmd("launch", "launch.backend=ray", "launch.nproc_per_node=2", "launch.max_restarts=1",
                      "launch.ray.num_cpus=2", "launch.ray.cpus_per_worker=1", *tiny_overrides(tmp_path)),
        env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: latest_checkpoint_step(tmp_path) > 0, 240, "the first checkpoint")
        assert max(metrics_steps(tmp_path)) < STEPS, "the run finished before the kill; make it longer"
        actors = _actor_pids(launcher.pid)
        assert len(actors) == 2, f"expected 2 Ray worker actors, found {[(p, cmdline(p)) for p in actors]}"
        os.kill(actors[-1], signal.SIGKILL)
        out, _ = launcher.communicate(timeout=240)
    finally:
        if launcher.poll() is None:
            launcher.send_signal(signal.SIGINT)  # lets the driver shut its local cluster down
            try:
                launcher.wait(timeout=30)
            except subprocess.TimeoutExpired:
                launcher.kill()
                launcher.wait()
    assert launcher.returncode == 0, out[-4000:]
    assert "ray: attempt 0 ended" in out and "ray: attempt 1:" in out, out[-4000:]
    assert "resumed from" in out, out[-4000:]
    assert "rank 0 result:" in out  # the driver reports rank 0's metrics
    assert final_loss(tmp_path) == reference_run
