"""The Ray backend on real Ray clusters: a 2-worker gloo job on a cluster the launcher starts, whose
worker is killed mid-run, restarts as a group, resumes from the checkpoint and ends at the same
loss as the undisturbed run; on a cluster started by ``ray start --head`` elsewhere, a relative
config and run directory work, and a worker's config error ends the job with its own one line
and no restart; an address where nothing listens is one line within seconds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from test_launch_common import (TINY, STEPS, cmdline, descendants, final_loss, latest_checkpoint_step, longtrain_cmd,
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


@pytest.fixture
def ray_head(tmp_path):
    """A Ray cluster started the README's way, ``ray start --head``, in a directory of its own (its
    workers run there); yields its address. Token auth off: this test's cluster is on loopback only."""
    import tempfile
    import time

    from longtrain.launch.env import free_port

    home = Path(tempfile.mkdtemp(prefix="/tmp/lt-ray-"))  # short: Ray's socket paths have a length limit
    port = free_port()
    env = {**worker_env(), "RAY_AUTH_MODE": "disabled"}
    head = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=false", f"--temp-dir={home / 't'}", "--disable-usage-stats"],
                            cwd=home, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        for line in head.stdout:  # "Ray runtime started." once the GCS and the raylet run
            if "Ray runtime started" in line or time.monotonic() > deadline:
                break
        assert head.poll() is None, "ray start --head exited"
        yield f"127.0.0.1:{port}", env
    finally:
        head.send_signal(signal.SIGTERM)  # ray start --block stops what it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()


def test_ray_relative_config_on_an_existing_cluster_and_a_worker_config_error_is_one_line_not_retried(
        tmp_path, ray_head):
    import yaml

    address, env = ray_head
    here = tmp_path / "project"
    here.mkdir()
    sections: dict = {}
    for kv in [*TINY, "schedule.steps=2", "schedule.warmup_steps=0", "logging.run_dir=runs/rel"]:
        key, value = kv.split("=", 1)
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = yaml.safe_load(value)
    (here / "my.yaml").write_text(yaml.safe_dump(sections))
    base = ["my.yaml", "launch.backend=ray", f"launch.ray.address={address}", "launch.nproc_per_node=1"]
    ok = subprocess.run(longtrain_cmd("launch", *base), cwd=here, env=env, capture_output=True, text=True,
                        timeout=300)
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    assert (here / "runs" / "rel" / "metrics.jsonl").is_file()  # where the user ran the launcher
    bad = subprocess.run(longtrain_cmd("launch", *base, "launch.max_restarts=2", "parallel.tp=2"), cwd=here,
                         env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2, bad.stdout[-3000:] + bad.stderr[-3000:]
    assert "rank 0: longtrain: config error: " in bad.stderr and "RayTaskError" not in bad.stderr, bad.stderr[-3000:]
    assert "not restarted" in bad.stderr and "attempt 1" not in bad.stdout + bad.stderr


def test_ray_address_where_nothing_listens_is_one_line_within_seconds(capsys):
    import time

    from longtrain.cli import main
    from longtrain.launch.env import free_port

    t0 = time.monotonic()
    rc = main(["launch", *TINY, "launch.backend=ray", f"launch.ray.address=127.0.0.1:{free_port()}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("longtrain: config error: launch.ray.address=127.0.0.1:") and "nothing answers" in err[0]
    assert "ray start --head" in err[0]
    assert time.monotonic() - t0 < 30  # promised: within 10 s; ray.init alone retried for minutes
