"""A run with periodic evaluation that fails mid-way and resumes from its last checkpoint logs
bitwise the same eval losses after the resume as a run that was never interrupted, and its final
checkpoint equals that run's -- model, optimizer, schedule, data position, counters and every RNG
state -- in one process and with two FSDP ranks (gloo, CPU).

Every eval reads the same held-out batches (the first ``schedule.eval_batches`` of the eval
split), so there is no eval position to lose in a resume, and evals at different steps compare.
The failure is a real injected fault (``LONGTRAIN_FAULT=raise@step:5``) after the step-3 save.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_utils import run_distributed

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
STEPS, FAIL_AT = 8, 5


def overrides(run_dir: str, world: int) -> list[str]:
    return ["model.arch=llama", "model.vocab_size=264", "model.dim=32", "model.n_heads=4", "model.n_kv_heads=2",
            "model.ffn_dim=64", "model.n_layers=2", "model.max_seq_len=64", "data.seq_len=32",
            "data.batch_size=2", "data.stdlib_mb=1", f"schedule.steps={STEPS}", "schedule.warmup_steps=2",
            "schedule.eval_every=2", "schedule.eval_batches=2", "schedule.device=cpu", "logging.log_every=1",
            "logging.progress=false", "logging.tensorboard=false", f"logging.run_dir={run_dir}",
            "checkpoint.every_steps=3", "checkpoint.async_save=false", "checkpoint.save_final=true",
            "parallel.backend=gloo", "parallel.param_dtype=fp32", f"parallel.dp_shard={world}"]


def run(run_dir: str, world: int, fault: str) -> None:
    """One ``train()``; with ``fault`` set it fails as that fault says (an injected RuntimeError)."""
    from longtrain.config import load_config
    from longtrain.trainer.train import train

    os.environ.pop("LONGTRAIN_FAULT", None)
    if fault:
        os.environ["LONGTRAIN_FAULT"] = fault
    try:
        train(load_config(None, overrides(run_dir, world)))
    except RuntimeError as e:
        if "injected fault" not in str(e):
            raise
    finally:
        os.environ.pop("LONGTRAIN_FAULT", None)


def go(run_dir: Path, world: int, fault: str = "") -> None:
    if world == 1:
        run(str(run_dir), 1, fault)
    else:
        run_distributed(run, world, str(run_dir), world, fault)


def eval_losses(run_dir: Path, start_line: int = 0) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()[start_line:]
    return {r["step"]: r["eval_loss"] for r in map(json.loads, lines) if "eval_loss" in r}


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
    expect = eval_losses(straight)
    assert sorted(expect) == [2, 4, 6, 8]
    go(resumed, world, f"raise@step:{FAIL_AT}:phase=forward")
    assert (resumed / "checkpoints" / "step-3").is_dir() and not (resumed / "checkpoints" / "step-6").exists()
    n_lines = len((resumed / "metrics.jsonl").read_text().splitlines())
    go(resumed, world)
    again = eval_losses(resumed, n_lines)
    assert sorted(again) == [4, 6, 8]  # resumed from step-3, not from scratch
    for s in again:
        assert again[s] == expect[s], (s, again[s], expect[s])  # bitwise
    # evals at different steps read the same held-out batches: the loss changes with the weights only
    assert len(set(expect.values())) == len(expect)
    diff = differences(checkpoint_contents(straight / "checkpoints" / f"step-{STEPS}"),
                       checkpoint_contents(resumed / "checkpoints" / f"step-{STEPS}"))
    assert not diff, f"the final checkpoints differ in: {diff[:10]}"


def test_resumed_run_has_the_same_eval_losses_and_final_checkpoint_single_process(tmp_path):
    check(tmp_path, 1)


def test_resumed_run_has_the_same_eval_losses_and_final_checkpoint_two_ranks(tmp_path):
    check(tmp_path, 2)
