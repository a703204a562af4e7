"""A run with periodic evaluation that is killed mid-way and resumes from its last checkpoint
logs bitwise the same eval losses after the resume as a run that was never interrupted, and its
final checkpoint equals that run's -- model, optimizer, schedule, data position, counters and every
RNG state -- on CPU. ``check(tmp_path, 2)`` runs the same with two FSDP ranks under ``longtrain
launch`` (which restarts the group itself); it passes too (52 s) and is left out of CI for time
(tests/test_ckpt_resume.py covers two-rank resume of the training losses).

Every eval reads the same held-out batches (the first ``schedule.eval_batches`` of the eval
split), so there is no eval position to lose in a resume, and evals at different steps compare.
The kill is a real injected fault (``LONGTRAIN_FAULT=kill@step:5``: SIGKILL mid-forward, after the
step-3 save); every run is a process of its own, as a relaunched job is.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from test_ckpt_resume import STEPS as CKPT_STEPS
from test_ckpt_resume import overrides as ckpt_resume_overrides
from test_launch_common import longtrain_cmd, worker_env

STEPS, FAIL_AT = CKPT_STEPS, 5  # schedule.steps comes from test_ckpt_resume's overrides


def overrides(run_dir: Path, world: int) -> list[str]:
    """test_ckpt_resume's run, with evals every 2 steps and synchronous saves (later overrides win)."""
    return [*ckpt_resume_overrides(run_dir, world), "schedule.eval_every=2", "schedule.eval_batches=2",
            "checkpoint.async_save=false", "checkpoint.save_final=true"]


def go(run_dir: Path, world: int, fault: str = "") -> None:
    """One process (``longtrain.launch.worker``, run again by hand after the kill) or a 2-worker
    ``longtrain launch`` (which restarts the group after the kill, once)."""
    env = worker_env()
    env.pop("LONGTRAIN_FAULT", None)
    if fault:
        env["LONGTRAIN_FAULT"] = fault
    if world == 1:
        cmd = [sys.executable, "-m", "longtrain.launch.worker", *overrides(run_dir, 1)]
    else:
        cmd = longtrain_cmd("launch", "launch.backend=local", f"launch.nproc_per_node={world}",
                            "launch.max_restarts=1", *overrides(run_dir, world))
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    expect_rc = -9 if fault and world == 1 else 0
    assert r.returncode == expect_rc, (r.returncode, r.stdout[-3000:] + r.stderr[-3000:])


def eval_losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["eval_loss"]) for r in map(json.loads, lines) if "eval_loss" in r]


def checkpoint_contents(path: Path) -> dict:
    """Everything a checkpoint holds (DCP tensors and the pickled small states, unpickled)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = path.parent / f"{path.name}.pt"
    dcp_to_torch_save(path, out)
    sd = torch.load(out, weights_only=False)

    def unblob(x):
        if isinstance(x, dict):
            return {k: unblob(v) for k, v in x.items()}
        return pickle.loads(x) if isinstance(x, (bytes, bytearray)) else x

    return unblob(sd)


def differences(a, b, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys {sorted(set(a) ^ set(b))}"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return [] if a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) else [where]
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return [] if np.array_equal(a, b) else [where]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def check(tmp_path: Path, world: int) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    go(straight, world)
    expect = dict(eval_losses(straight))
    assert sorted(expect) == [2, 4, 6, 8]
    # evals at different steps read the same held-out batches: the loss changes with the weights only
    assert len(set(expect.values())) == len(expect)
    go(resumed, world, f"kill@step:{FAIL_AT}:phase=forward" + (":rank=1" if world > 1 else ""))
    if world == 1:
        go(resumed, world)
    got = eval_losses(resumed)
    # steps 2 and 4 before the kill, then 4, 6 and 8 again after resuming from step-3 (not from scratch)
    assert [s for s, _ in got] == [2, 4, 4, 6, 8], got
    for s, loss in got[2:]:
        assert loss == expect[s], (s, loss, expect[s])  # bitwise
    diff = differences(checkpoint_contents(straight / "checkpoints" / f"step-{STEPS}"),
                       checkpoint_contents(resumed / "checkpoints" / f"step-{STEPS}"))
    assert not diff, f"the final checkpoints differ in: {diff[:10]}"


def test_killed_and_resumed_run_has_the_same_eval_losses_and_final_checkpoint_one_process(tmp_path):
    check(tmp_path, 1)

