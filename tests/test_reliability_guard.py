"""Non-finite losses and gradients, and loss spikes, never reach the weights.

Faults come from ``LONGTRAIN_FAULT`` (``longtrain.trainer.faults``): ``nan``/``inf`` at ``forward``
poison the step's loss, at ``backward`` the gradients (the loss stays finite); ``spike`` multiplies
the loss by 1000. ``optim.on_nonfinite`` decides: ``skip`` (the update is dropped and logged),
``stop`` (an error naming the step and the policy) or ``rollback`` (reload the last checkpoint).
A checkpoint every step shows exactly which step did not change the weights.
"""

from __future__ import annotations

import re

import pytest
import torch

from longtrain.config import load_config
from longtrain.trainer.checkpoint_format import load_full_model_state, verify_checkpoint
from longtrain.trainer.guard import NonFiniteError
from longtrain.trainer.ledger import read_ledger
from test_launch_common import TINY


def run(tmp_path, monkeypatch, fault: str, *extra: str, steps: int = 6) -> dict:
    from longtrain.trainer.train import train

    monkeypatch.setenv("LONGTRAIN_FAULT", fault)
    cfg = load_config(None, [*TINY, f"schedule.steps={steps}", "checkpoint.every_steps=1", "checkpoint.keep_last=20",
                             "logging.ledger=true", f"logging.run_dir={tmp_path}", *extra])
    return train(cfg)


def weights(tmp_path, step: int) -> dict:
    return load_full_model_state(tmp_path / "checkpoints" / f"step-{step}")


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fault,reason", [
    ("nan@step:3", r"non-finite loss=nan"),
    ("inf@step:3:phase=forward", r"non-finite loss=inf"),
    ("nan@step:3:phase=backward", r"non-finite loss=[0-9.]+ grad_norm=nan"),  # finite loss, bad gradients
    ("inf@step:3:phase=backward", r"non-finite loss=[0-9.]+ grad_norm=(inf|nan)"),
])
def test_nonfinite_step_is_skipped_logged_and_leaves_the_weights(tmp_path, monkeypatch, capsys, fault, reason):
    out = run(tmp_path, monkeypatch, fault)
    log = capsys.readouterr().out
    assert out["step"] == 6
    assert re.search(f"skipped update at step 3: {reason} .*optim.on_nonfinite=skip", log), log[-2000:]
    # the update of step 3 (between checkpoints step-3 and step-4) was dropped; the others applied
    assert same(weights(tmp_path, 3), weights(tmp_path, 4))
    assert not same(weights(tmp_path, 2), weights(tmp_path, 3))
    assert not same(weights(tmp_path, 4), weights(tmp_path, 5))
    applied = {e["step"]: e["applied"] for e in read_ledger(tmp_path)}
    assert applied == {s: s != 3 for s in range(6)}
    assert torch.isfinite(torch.cat([t.flatten() for t in weights(tmp_path, 6).values()])).all()


def test_loss_spike_is_skipped_by_spike_factor(tmp_path, monkeypatch, capsys):
    run(tmp_path, monkeypatch, "spike@step:7", "optim.spike_factor=3", steps=9)
    log = capsys.readouterr().out
    assert "skipped update at step 7: loss spike" in log and "x recent mean" in log, log[-2000:]
    assert same(weights(tmp_path, 7), weights(tmp_path, 8))
    assert [e["step"] for e in read_ledger(tmp_path) if not e["applied"]] == [7]


def test_a_spike_is_trained_on_when_spike_factor_is_off(tmp_path, monkeypatch, capsys):
    run(tmp_path, monkeypatch, "spike@step:7", steps=9)
    assert "skipped" not in capsys.readouterr().out
    assert all(e["applied"] for e in read_ledger(tmp_path))


def test_nonfinite_with_policy_stop_raises_naming_step_and_policy(tmp_path, monkeypatch):
    with pytest.raises(NonFiniteError, match=r"step 2: non-finite loss=nan.*on_nonfinite=stop; use skip or rollback"):
        run(tmp_path, monkeypatch, "nan@step:2", "optim.on_nonfinite=stop")
    verify_checkpoint(tmp_path / "checkpoints" / "step-2")  # the last good step is saved; step 3 never was
    assert not (tmp_path / "checkpoints" / "step-3").exists()


def test_nonfinite_with_policy_rollback_reloads_the_last_checkpoint_and_finishes(tmp_path, monkeypatch, capsys):
    out = run(tmp_path, monkeypatch, "nan@step:4", "optim.on_nonfinite=rollback", "checkpoint.every_steps=2")
    log = capsys.readouterr().out
    assert out["step"] == 6
    assert "step 4: non-finite loss=nan" in log and "rolled back to step-4" in log, log[-2000:]
    steps = [e["step"] for e in read_ledger(tmp_path)]
    assert steps == [0, 1, 2, 3, 4, 5]  # the bad step 4 was not recorded as trained; 4 and 5 ran after it


def test_fault_hooks_are_inert_unless_longtrain_fault_is_set(monkeypatch):
    from torch.distributed.checkpoint import filesystem

    from longtrain.trainer.faults import install_faults, parse_faults

    monkeypatch.delenv("LONGTRAIN_FAULT", raising=False)
    writer = filesystem._FileSystemWriter.write_data
    model = torch.nn.Linear(2, 2)
    assert install_faults(model, torch.optim.SGD(model.parameters(), lr=0.1), None, None) is None
    assert filesystem._FileSystemWriter.write_data is writer  # the DCP writer is not wrapped
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert [str(f) for f in parse_faults("kill@step:3:phase=backward:rank=1, enospc@step:4")] == \
        ["kill@step:3:phase=backward:rank=1:attempt=0", "enospc@step:4:phase=checkpoint-write:attempt=0"]
