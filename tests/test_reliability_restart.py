"""A worker killed anywhere in a step -- mid-forward, mid-backward, mid-optimizer-step, mid-checkpoint-
write, on rank 0 (the store's host) or rank 1 -- costs a restart and nothing else: the local launcher
(``launch.max_restarts=1``) restarts the group, it resumes from the newest complete checkpoint, and
the final weights, the loss of every step and the data of every step equal an undisturbed run's.

The data audit reads the sample ledger (``logging.ledger=true``): per rank and step, the global
sample indices read and a sha1 of the exact tokens. The final model's lineage (per step, the entry
of the last attempt that completed it) must hold every step exactly once, with the undisturbed
run's samples, digests and losses, and every global sample index exactly once.

Besides the fixed kill points, one more is drawn at random each run (its seed is in the test id;
``LONGTRAIN_FAULT_SEED`` replays it). Faults come from ``LONGTRAIN_FAULT`` (``longtrain.trainer.faults``); Ray and Slurm restarts are
covered by tests/test_launch_ray.py and tests/test_launch_slurm.py.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import time
from collections import Counter

import pytest
import torch

from longtrain.trainer.checkpoint_format import load_full_model_state, verify_checkpoint
from longtrain.trainer.ledger import lineage, read_ledger
from test_launch_common import TINY, longtrain_cmd, worker_env

STEPS, EVERY, NPROC, BATCH = 16, 4, 2, 2


def launch(run_dir, fault: str = "", *extra: str, restarts: int = 1) -> subprocess.CompletedProcess:
    env = worker_env()
    env.pop("LONGTRAIN_FAULT", None)
    if fault:
        env["LONGTRAIN_FAULT"] = fault
    args = ["launch", "launch.backend=local", f"launch.nproc_per_node={NPROC}", f"launch.max_restarts={restarts}",
            *TINY, f"schedule.steps={STEPS}", f"checkpoint.every_steps={EVERY}", "checkpoint.keep_last=10",
            "logging.ledger=true", f"logging.run_dir={run_dir}", *extra]
    return subprocess.run(longtrain_cmd(*args), env=env, capture_output=True, text=True, timeout=240)


def losses_by_step(run_dir) -> dict[int, float]:
    """The last logged loss of every step (a restarted run logs its redone steps again)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("undisturbed")
    r = launch(run_dir, restarts=0)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {"dir": run_dir, "lineage": lineage(read_ledger(run_dir)), "losses": losses_by_step(run_dir),
            "model": load_full_model_state(run_dir / "checkpoints" / f"step-{STEPS}")}


CASES = [  # (phase, step, rank, extra overrides): kill points spread over steps, phases and ranks
    ("forward", 6, 1, ()),
    ("backward", 9, 0, ()),  # rank 0 also hosts the rendezvous store
    ("optimizer", 11, 1, ()),  # weights updated, step counter not yet
    ("checkpoint-write", 8, 1, ()),  # shards of step 8 written, no .metadata: resume must use step 4
    ("checkpoint-write", 12, 0, ("checkpoint.async_save=true",)),  # in the background writer thread
]


def random_case(seed: int):
    """One more kill point drawn at random: any phase, any rank, any step after the first checkpoint
    (a checkpoint-write kill only where a save happens). The seed is in the test's id; rerun a
    failure with LONGTRAIN_FAULT_SEED=<seed>."""
    rng = random.Random(seed)
    phase = rng.choice(["forward", "backward", "optimizer", "checkpoint-write"])
    step = rng.choice(range(2 * EVERY, STEPS, EVERY)) if phase == "checkpoint-write" else rng.randrange(EVERY, STEPS)
    extra = ("checkpoint.async_save=true",) if phase == "checkpoint-write" and rng.random() < 0.5 else ()
    return phase, step, rng.randrange(NPROC), extra


_SEED = int(os.environ.get("LONGTRAIN_FAULT_SEED", time.time_ns() % 2**31))
CASES.append(random_case(_SEED))
IDS = [f"{c[0]}-step{c[1]}-rank{c[2]}" for c in CASES[:-1]] + [f"random-seed{_SEED}-{CASES[-1][0]}-step{CASES[-1][1]}-rank{CASES[-1][2]}"]


@pytest.mark.parametrize("phase,step,rank,extra", CASES, ids=IDS)
def test_killed_worker_restarts_and_loses_nothing(tmp_path, undisturbed, phase, step, rank, extra):
    r = launch(tmp_path, f"kill@step:{step}:phase={phase}:rank={rank}", *extra)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    assert f"rank {rank}: injecting fault kill@step:{step}:phase={phase}" in out, out[-3000:]
    resumed = [int(m) for m in re.findall(r"resumed from \S*step-(\d+)", out)]
    expect_resume = (step - 1) // EVERY * EVERY if phase == "checkpoint-write" else step // EVERY * EVERY
    assert resumed == [expect_resume], f"resumed from {resumed}, expected step {expect_resume}\n{out[-3000:]}"
    # an interrupted save never became a checkpoint (the survivor's save failed and removed it, or
    # the restarted run did), and nothing unfinished is left behind
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))

    entries = read_ledger(tmp_path)
    attempts = {e["attempt"] for e in entries}
    assert attempts == {0, 1}, attempts
    # attempt 0 got no further than the kill; attempt 1 started exactly at the checkpoint it resumed
    if phase != "checkpoint-write":  # the killed rank never finished its step; a peer may have (its
        # update then died with it, unsaved) but got no further: the next collective needs the dead rank
        assert max(e["step"] for e in entries if e["attempt"] == 0 and e["rank"] == rank) < step
        assert max(e["step"] for e in entries if e["attempt"] == 0) <= step
    assert min(e["step"] for e in entries if e["attempt"] == 1) == expect_resume
    # steps redone after the restart trained on exactly the data attempt 0 had used for them
    first = {(e["step"], e["rank"]): e for e in entries if e["attempt"] == 0}
    for e in entries:
        if e["attempt"] == 1 and (e["step"], e["rank"]) in first:
            assert (e["samples"], e["digest"], e["loss"]) == (first[e["step"], e["rank"]]["samples"],
                                                            first[e["step"], e["rank"]]["digest"],
                                                            first[e["step"], e["rank"]]["loss"])

    mine, ref = lineage(entries), undisturbed["lineage"]
    assert sorted(mine) == sorted(ref) == [(s, rk) for s in range(STEPS) for rk in range(NPROC)], \
        "every step exactly once per rank in the final model's history"
    for key, e in mine.items():
        assert (e["samples"], e["digest"], e["applied"], e["loss"]) == \
            (ref[key]["samples"], ref[key]["digest"], True, ref[key]["loss"]), f"step/rank {key} differs"
    counts = Counter(i for e in mine.values() for i in e["samples"])
    assert sorted(counts) == list(range(STEPS * NPROC * BATCH)) and set(counts.values()) == {1}, \
        "every global sample trained exactly once: none skipped, none repeated"

    assert losses_by_step(tmp_path) == undisturbed["losses"], "loss curve differs from the undisturbed run"
    final = tmp_path / "checkpoints" / f"step-{STEPS}"
    verify_checkpoint(final)
    model = load_full_model_state(final)
    assert model.keys() == undisturbed["model"].keys()
    for name, t in model.items():
        assert torch.equal(t, undisturbed["model"][name]), f"final weight {name} differs"
