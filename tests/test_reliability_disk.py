"""A checkpoint save that cannot be written -- full disk, read-only directory, a file where the
directory should be -- fails clearly (the error names the step, the path, the OS error and what to
change), leaves the previous checkpoint committed and valid, and then, by
``checkpoint.on_save_error``, training continues (``continue``) or stops (``stop``).

Full disk twice: for real, on a 1 MiB tmpfs that holds one checkpoint of the tiny model but not two
(needs root and mount; skipped otherwise), and by ``LONGTRAIN_FAULT=enospc@...`` raising ENOSPC
inside DCP's file writer on one rank of two (the ranks must agree on the outcome). The tests run as
root, so chmod would not stop them: the read-only case is a read-only bind mount.
"""

from __future__ import annotations

import subprocess
from contextlib import contextmanager

import pytest

from dist_utils import run_distributed
from longtrain.config import load_config
from longtrain.trainer.checkpoint_format import CheckpointError, read_latest, step_dirs, verify_checkpoint
from test_launch_common import TINY


def cfg_for(run_dir, ckpt_dir=None, *extra: str, steps: int = 6):
    return load_config(None, [*TINY, f"schedule.steps={steps}", "checkpoint.every_steps=2", "checkpoint.keep_last=5",
                              f"logging.run_dir={run_dir}", *([f"checkpoint.dir={ckpt_dir}"] if ckpt_dir else []),
                              *extra])


def committed(root) -> list[int]:
    return [s for s, _ in step_dirs(root)]


def assert_only_valid(root, steps: list[int]) -> None:
    assert committed(root) == steps
    assert read_latest(root).name == f"step-{steps[-1]}"
    for s in steps:
        verify_checkpoint(root / f"step-{s}")
    assert not list(root.glob("*.tmp")), "a failed save left its temporary directory"


@contextmanager
def mounted(*cmds: list[str], target):
    done = []
    try:
        for c in cmds:
            r = subprocess.run(c, capture_output=True, text=True)
            if r.returncode != 0:
                pytest.skip(f"cannot {' '.join(c)} here: {r.stderr.strip()}")
            done.append(c)
        yield target
    finally:
        if done:
            subprocess.run(["umount", "-l", str(target)], capture_output=True)


# ------------------------------------------------------------------ injected ENOSPC on one rank of two


def _train_two_ranks(run_dir: str, policy: str):
    from longtrain.trainer.train import train

    try:
        out = train(cfg_for(run_dir, None, f"checkpoint.on_save_error={policy}"))
        return {"step": out["step"]}
    except CheckpointError as e:
        return {"error": str(e)}


@pytest.mark.parametrize("policy", ["continue", "stop"])
def test_enospc_on_one_rank_fails_the_save_on_every_rank_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, policy):
    monkeypatch.setenv("LONGTRAIN_FAULT", "enospc@step:4:phase=checkpoint-write:rank=1")
    results = run_distributed(_train_two_ranks, 2, str(tmp_path), policy, init_process_group=False)
    root = tmp_path / "checkpoints"
    if policy == "continue":
        assert results == [{"step": 6}, {"step": 6}]  # training went on past the failed save
        assert_only_valid(root, [2, 6])
    else:
        for r in results:  # every rank stops, with the same clear error
            assert "checkpoint save of step 4" in r["error"] and "No space left on device" in r["error"]
            assert "checkpoint.on_save_error=stop" in r["error"] and "writable directory with room" in r["error"]
        assert_only_valid(root, [2])


# ------------------------------------------------------------------ a real full disk


def test_real_full_tmpfs_keeps_the_first_checkpoint_and_training_continues(tmp_path, capsys):
    from longtrain.trainer.train import train

    disk = tmp_path / "disk"
    disk.mkdir()
    with mounted(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], target=disk):
        out = train(cfg_for(tmp_path / "run", disk))
        log = capsys.readouterr().out
        assert out["step"] == 6
        assert "checkpoint save of step 4" in log and "No space left on device" in log, log[-3000:]
        assert "training continues (checkpoint.on_save_error=continue)" in log
        assert_only_valid(disk, [2])  # step-2 fit; 4, 6 and the final save did not, and left nothing


def test_real_full_tmpfs_with_policy_stop_stops_at_the_failed_save(tmp_path):
    from longtrain.trainer.train import train

    disk = tmp_path / "disk"
    disk.mkdir()
    with mounted(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], target=disk):
        with pytest.raises(CheckpointError, match=r"save of step 4 .*No space left on device.*on_save_error=stop"):
            train(cfg_for(tmp_path / "run", disk, "checkpoint.on_save_error=stop"))
        assert_only_valid(disk, [2])


# ------------------------------------------------------------------ unwritable checkpoint directories


def test_read_only_checkpoint_dir_fails_saves_clearly_after_resuming_from_it(tmp_path, capsys):
    from longtrain.trainer.train import train

    ckpt = tmp_path / "ckpt"
    train(cfg_for(tmp_path / "run", ckpt, steps=2))  # a first run commits step-2
    with mounted(["mount", "--bind", str(ckpt), str(ckpt)], ["mount", "-o", "remount,ro,bind", str(ckpt)], target=ckpt):
        capsys.readouterr()
        out = train(cfg_for(tmp_path / "run", ckpt, steps=4))  # resumes from the read-only step-2, trains on
        log = capsys.readouterr().out
        assert out["step"] == 4 and "resumed from" in log
        assert "checkpoint save of step 4" in log and "Read-only file system" in log, log[-3000:]
        assert f"Make checkpoint.dir={str(ckpt)!r} a writable directory" in log
        assert_only_valid(ckpt, [2])


@pytest.mark.parametrize("policy", ["continue", "stop"])
def test_a_file_where_the_checkpoint_dir_should_be_fails_the_save_by_policy(tmp_path, capsys, policy):
    from longtrain.trainer.train import train

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file, not a directory")
    cfg = cfg_for(tmp_path / "run", blocker / "checkpoints", f"checkpoint.on_save_error={policy}")
    if policy == "continue":
        assert train(cfg)["step"] == 6
        log = capsys.readouterr().out
        assert "checkpoint save of step 2" in log and "Not a directory" in log and "writable directory" in log
    else:
        with pytest.raises(CheckpointError, match=r"save of step 2 .*Not a directory.*writable directory.*on_save_error=stop"):
            train(cfg)
    assert blocker.read_text() == "a file, not a directory"


def test_a_disk_full_mid_shard_says_no_space_left_on_the_directory(tmp_path):
    """A 1 MiB tmpfs filled so that the save runs out inside torch.save's zip writer, which reports
    only "unexpected pos A vs B"; the message must say the disk is full, and where."""
    from longtrain.trainer.train import train

    disk = tmp_path / "disk"
    disk.mkdir()
    with mounted(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], target=disk):
        (disk / "filler").write_bytes(b"\0" * (640 << 10))  # leaves about one shard's worth minus a bit
        with pytest.raises(CheckpointError) as e:
            train(cfg_for(tmp_path / "run", disk / "ck", "checkpoint.on_save_error=stop", steps=2))
        assert f"no space left on {disk / 'ck'}" in str(e.value), str(e.value)
        assert "\n" not in str(e.value)
