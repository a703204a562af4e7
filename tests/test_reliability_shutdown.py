"""Graceful shutdown through the local launcher: Ctrl-C (SIGINT) or SIGTERM to ``longtrain launch``
commits a checkpoint of the step the workers were at, trains nothing after it, and leaves no process.

The launcher (torch elastic) passes the signal to every worker; each worker's handler asks the
Checkpointer to save at the next step all ranks agree on, then exit with code 85. No periodic
checkpoint is configured, so the only checkpoint can come from the signal.
"""

from __future__ import annotations

import signal
import subprocess

import pytest

from longtrain.trainer.checkpoint_format import read_meta, verify_checkpoint
from longtrain.trainer.ledger import read_ledger
from test_launch_common import (TINY, alive, cmdline, descendants, latest_checkpoint_step, longtrain_cmd,
                                metrics_steps, wait_for, worker_env)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_signal_to_the_launcher_commits_the_current_step_and_leaves_no_worker(tmp_path, sig):
    launcher = subprocess.Popen(longtrain_cmd("launch", "launch.backend=local", "launch.nproc_per_node=2", *TINY,
                                              "schedule.steps=100000", "checkpoint.every_steps=0",
                                              "logging.ledger=true", f"logging.run_dir={tmp_path}"),
                                env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: len(metrics_steps(tmp_path)) >= 5, 180, "2 workers training")
        everything = descendants(launcher.pid)
        workers = [p for p in everything if "longtrain.launch.worker" in cmdline(p)]
        assert len(workers) == 2, workers
        launcher.send_signal(sig)
        out, _ = launcher.communicate(timeout=90)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert launcher.returncode == 128 + int(sig), out[-4000:]
    step = latest_checkpoint_step(tmp_path)
    assert step >= 5, out[-4000:]
    ckpt = tmp_path / "checkpoints" / f"step-{step}"
    verify_checkpoint(ckpt)
    assert read_meta(ckpt)["step"] == step
    assert f"saved step {step} on request; exiting with code 85" in out
    # the checkpoint is the step the workers were at: nothing was trained after it, by any rank
    assert max(metrics_steps(tmp_path)) == step
    assert {max(e["step"] for e in read_ledger(tmp_path) if e["rank"] == r) for r in (0, 1)} == {step - 1}
    assert not list((tmp_path / "checkpoints").glob("*.tmp")), "an unfinished save was left behind"
    leftover = [p for p in everything if alive(p)]
    assert not leftover, f"processes left: {[(p, cmdline(p)) for p in leftover]}"
