"""End to end through ``train(cfg)``: a run that crashes after its step-3 checkpoint and is started
again with ``checkpoint.resume=auto`` logs bitwise the same next five losses as a run that was
never interrupted -- in one process and with two FSDP ranks (dp_shard=2, gloo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dist_utils import run_distributed

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
STEPS, CRASH_AFTER = 8, 5


def overrides(run_dir: Path, world: int) -> list[str]:
    return ["model.arch=llama", "model.vocab_size=264", "model.dim=32", "model.n_heads=4", "model.n_kv_heads=2",
            "model.ffn_dim=64", "model.n_layers=2", "model.max_seq_len=64", "data.seq_len=32",
            "data.batch_size=2", "data.stdlib_mb=1", f"schedule.steps={STEPS}", "schedule.warmup_steps=2",
            "schedule.eval_every=0", "schedule.device=cpu", "logging.log_every=1", "logging.progress=false",
            "logging.tensorboard=false", f"logging.run_dir={run_dir}", "checkpoint.every_steps=3",
            "parallel.backend=gloo", "parallel.param_dtype=fp32", f"parallel.dp_shard={world}"]


class Crash(RuntimeError):
    pass


def run(run_dir: str, world: int, crash: bool, extra: tuple = ()) -> None:
    """One ``train()``; with ``crash`` it dies after step CRASH_AFTER (its step-3 save committed)."""
    from longtrain.config import load_config
    from longtrain.trainer import checkpoint
    from longtrain.trainer.train import train

    orig = checkpoint.Checkpointer.after_step

    def after_step(self):
        orig(self)
        if crash and self.step == CRASH_AFTER:
            self.wait()  # let the async step-3 save commit; the process then dies
            raise Crash()

    checkpoint.Checkpointer.after_step = after_step
    try:
        train(load_config(None, overrides(Path(run_dir), world) + list(extra)))
    except Crash:
        pass
    finally:
        checkpoint.Checkpointer.after_step = orig


def losses(run_dir: Path, start_line: int = 0) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()[start_line:]
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def check(tmp_path: Path, world: int, extra: tuple = ()) -> None:
    def go(d, crash):
        if world == 1:
            run(str(d), 1, crash, extra)
        else:
            run_distributed(run, world, str(d), world, crash, extra)

    go(tmp_path / "straight", False)
    expect = losses(tmp_path / "straight")
    go(tmp_path / "resumed", True)
    first = losses(tmp_path / "resumed")
    assert sorted(first) == list(range(1, CRASH_AFTER + 1))
    n_lines = len((tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines())
    go(tmp_path / "resumed", False)
    again = losses(tmp_path / "resumed", n_lines)
    assert sorted(again) == list(range(4, STEPS + 1))  # resumed from step-3, not from scratch
    for s in range(4, 9):
        assert again[s] == expect[s], (s, again[s], expect[s])  # bitwise
    assert first[1] == expect[1]


def test_resume_equals_uninterrupted_single_process(tmp_path):
    check(tmp_path, 1)


def test_resume_equals_uninterrupted_with_optimizer_offload(tmp_path):
    check(tmp_path, 1, ("memory.optimizer_offload=true", "memory.optimizer_offload_impl=torch"))


def test_resume_equals_uninterrupted_two_ranks_dp_shard(tmp_path):
    check(tmp_path, 2)


def test_resume_equals_uninterrupted_two_ranks_background_staging(tmp_path):
    """checkpoint.staging=background: the copy of the FSDP shards runs beside the next step and the
    optimizer waits for it; the checkpoint still holds exactly step 3."""
    check(tmp_path, 2, ("checkpoint.staging=background",))


def test_resume_equals_uninterrupted_background_staging_with_optimizer_offload(tmp_path):
    check(tmp_path, 1, ("checkpoint.staging=background", "memory.optimizer_offload=true",
                        "memory.optimizer_offload_impl=torch"))


def test_rollback_in_the_loop_reloads_the_last_checkpoint_and_finishes(tmp_path, capsys):
    from longtrain.config import load_config
    from longtrain.trainer import guard
    from longtrain.trainer.train import train

    orig, fired = guard.StepGuard.accept, []

    def accept(self, state, loss, grad_norm):
        if state.step == 4 and not fired:  # as if step 5's loss were NaN
            fired.append(True)
            raise guard.RollbackRequested(f"step {state.step}: non-finite loss=nan")
        return orig(self, state, loss, grad_norm)

    guard.StepGuard.accept = accept
    try:
        result = train(load_config(None, overrides(tmp_path, 1) + ["optim.on_nonfinite=rollback",
                                                                   "checkpoint.async_save=false"]))
    finally:
        guard.StepGuard.accept = orig
    assert fired and result["step"] == STEPS
    assert "rolled back to step-3" in capsys.readouterr().out
