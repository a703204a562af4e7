"""The local backend (torch elastic): a killed worker or Ctrl-C stops every worker, no orphans;
with ``launch.max_restarts`` a killed worker's group restarts and resumes from the checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess

from test_launch_common import (STEPS, cmdline, descendants, final_loss, latest_checkpoint_step, longtrain_cmd,
                                alive, metrics_steps, reference_run, tiny_overrides, wait_for, worker_env)

__all__ = ["reference_run"]  # the session fixture, imported for pytest


def _start(run_dir, nproc: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(longtrain_cmd("launch", "launch.backend=local", f"launch.nproc_per_node={nproc}",
                                          *tiny_overrides(run_dir, 100_000, 0), *extra),
                            env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _workers(launcher_pid: int) -> list[int]:
    return sorted(p for p in descendants(launcher_pid) if "longtrain.launch.worker" in cmdline(p))


def test_local_four_workers_all_stop_and_leave_no_process_when_one_is_killed(tmp_path):
    launcher = _start(tmp_path, 4)
    try:
        wait_for(lambda: len(metrics_steps(tmp_path)) >= 3, 180, "4 workers training")
        workers = _workers(launcher.pid)
        everything = descendants(launcher.pid)
        assert len(workers) == 4, f"expected 4 worker processes, found {workers}"
        os.kill(workers[1], signal.SIGKILL)
        out, _ = launcher.communicate(timeout=90)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert launcher.returncode == 1, out[-3000:]
    assert "failed with exit code" in out
    leftover = [p for p in everything if alive(p)]
    assert not leftover, f"processes left after the launcher exited: {[(p, cmdline(p)) for p in leftover]}"


def test_local_ctrl_c_stops_every_worker(tmp_path):
    launcher = _start(tmp_path, 2)
    try:
        wait_for(lambda: len(metrics_steps(tmp_path)) >= 2, 180, "2 workers training")
        everything = descendants(launcher.pid)
        assert len(_workers(launcher.pid)) == 2
        launcher.send_signal(signal.SIGINT)
        out, _ = launcher.communicate(timeout=90)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert launcher.returncode != 0, out[-3000:]
    leftover = [p for p in everything if alive(p)]
    assert not leftover, f"processes left after Ctrl-C: {[(p, cmdline(p)) for p in leftover]}"


def test_local_restart_after_a_killed_worker_resumes_and_matches_the_undisturbed_loss(tmp_path, reference_run):
    launcher = subprocess.Popen(longtrain_cmd("launch", "launch.backend=local", "launch.nproc_per_node=2",
                                              "launch.max_restarts=1", *tiny_overrides(tmp_path)),
                                env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: latest_checkpoint_step(tmp_path) > 0, 180, "the first checkpoint")
        killed_at = max(metrics_steps(tmp_path))
        assert killed_at < STEPS, "the run finished before the kill; make it longer"
        os.kill(_workers(launcher.pid)[1], signal.SIGKILL)
        out, _ = launcher.communicate(timeout=180)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert launcher.returncode == 0, out[-4000:]
    assert "restart 1" in out and "resumed from" in out.lower(), out[-4000:]
    assert final_loss(tmp_path) == reference_run


def test_local_a_worker_config_error_under_max_restarts_is_one_attempt_and_exit_code_2(tmp_path):
    from test_launch_common import TINY

    # parallel.tp=3 fits no world of 2: each worker finds it (the launcher cannot: it has no world size)
    r = subprocess.run(longtrain_cmd("launch", "launch.backend=local", "launch.nproc_per_node=2",
                                     "launch.max_restarts=3", *TINY, "parallel.tp=3", f"logging.run_dir={tmp_path}"),
                       env=worker_env(), capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-3000:]
    assert "longtrain: config error: world size 2 is not divisible" in out, out[-3000:]
    assert "no restart can fix" in r.stderr and "restarting the group" not in out, out[-3000:]
    assert len(list((tmp_path / "launch").glob("*/attempt_*"))) == 1  # one elastic launch, not four
