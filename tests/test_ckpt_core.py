"""Checkpointer properties in one process: exact resume, async isolation, atomic commit under
SIGKILL, retention, damaged checkpoints (clear errors, auto fallback), on-demand saves, the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from longtrain.config import load_config
from longtrain.models import build_model
from longtrain.parallel.mesh import ParallelDims
from longtrain.trainer.checkpoint import Checkpointer
from longtrain.trainer.checkpoint_format import (CheckpointCorrupt, CheckpointError, CheckpointMismatch, read_latest,
                                                 step_dirs)
from longtrain.trainer.signals import EXIT_CODE_CHECKPOINTED, CheckpointedExit, SaveOnSignal
from longtrain.trainer.train import TrainState

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.arch=llama", "model.vocab_size=64", "model.dim=32", "model.n_heads=4", "model.n_kv_heads=2",
        "model.ffn_dim=64", "model.n_layers=2", "model.max_seq_len=64", "data.seq_len=16",
        "schedule.steps=20", "schedule.warmup_steps=2"]


class RandomLoader:
    """Batches drawn from the global torch RNG; its own state is only a position, so an exact
    resume needs the RNG state restored too."""

    def __init__(self, vocab: int):
        self.vocab, self.consumed = vocab, 0

    def __next__(self):
        self.consumed += 1
        t = torch.randint(0, self.vocab, (2, 16))
        return {"tokens": t, "labels": t.roll(-1, 1)}

    def state_dict(self):
        return {"consumed_samples": self.consumed}

    def load_state_dict(self, sd):
        self.consumed = sd["consumed_samples"]


def make(tmp_path, *over, seed=0):
    from longtrain.trainer.schedule import build_lr_scheduler

    cfg = load_config(None, TINY + [f"checkpoint.dir={tmp_path / 'ckpt'}", *over])
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = build_lr_scheduler(opt, cfg.schedule)
    loader, state = RandomLoader(cfg.model.vocab_size), TrainState()
    dims = ParallelDims.from_config(cfg, world_size=1)
    ck = Checkpointer(cfg, dims, tmp_path, model=model, optimizer=opt, scheduler=sched, loader=loader, state=state)
    return cfg, model, opt, sched, loader, state, ck


def step(model, opt, sched, loader, state) -> float:
    b = next(loader)
    loss = model(b["tokens"], labels=b["labels"]) / b["labels"].numel()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sched.step()
    state.step += 1
    return loss.item()


@pytest.mark.parametrize("staging", ["blocking", "background"])
def test_resume_continues_bitwise_like_an_uninterrupted_run(tmp_path, staging):
    _, *objs, ck = make(tmp_path / "a", "checkpoint.every_steps=3")
    uninterrupted = [step(*objs) for _ in range(8)]

    _, *objs, ck = make(tmp_path / "b", "checkpoint.every_steps=3", f"checkpoint.staging={staging}")
    for _ in range(4):  # saves at 3 (async); step 4 changes the weights while it is written
        step(*objs)
        ck.after_step()
    ck.wait()
    torch.manual_seed(123)  # the interrupted process's RNG is gone; resume must restore it
    _, *objs2, ck2 = make(tmp_path / "b", "checkpoint.every_steps=3", seed=99)
    assert ck2.maybe_resume().name == "step-3"
    assert objs2[-1].step == 3 and objs2[-2].consumed == 3
    resumed = [step(*objs2) for _ in range(5)]
    assert resumed == uninterrupted[3:]  # bitwise


@pytest.mark.parametrize("staging", ["blocking", "background"])
def test_async_save_holds_the_weights_of_its_step(tmp_path, staging):
    cfg, model, opt, sched, loader, state, ck = make(tmp_path, f"checkpoint.staging={staging}")
    step(model, opt, sched, loader, state)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ck.save()  # async: returns after staging ("blocking") or while it runs ("background")
    assert (ck._staging is not None) == (staging == "background")
    for _ in range(2):
        step(model, opt, sched, loader, state)
        assert ck._staging is None  # the optimizer step waited for the copy before changing weights
    ck.wait()
    _, model2, *_, ck2 = make(tmp_path, seed=5)
    ck2.load(tmp_path / "ckpt" / "step-1")
    for k, v in model2.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_background_staging_uses_a_fresh_stager_per_save(tmp_path):
    """A stager reused for a second save failed inside its copy under torch 2.11 (KeyError:
    <class 'type'>, on an H200): each save gets its own, closed once the save is written."""
    _, *objs, ck = make(tmp_path, "checkpoint.every_steps=1", "checkpoint.staging=background")
    seen = []
    for _ in range(3):
        step(*objs)
        ck.after_step()
        seen.append(ck._stager)
        ck.wait()
        assert ck._stager is None  # closed with its save
    assert len({id(s) for s in seen}) == 3 and None not in seen
    ck.finish()
    assert [s for s, _ in step_dirs(tmp_path / "ckpt")][-1] == 3
    assert read_latest(tmp_path / "ckpt").name == "step-3"


def test_retention_keeps_last_k_and_every_kth(tmp_path):
    _, *objs, ck = make(tmp_path, "checkpoint.every_steps=1", "checkpoint.keep_last=2", "checkpoint.keep_every=4",
                        "checkpoint.async_save=false")
    for _ in range(9):
        step(*objs)
        ck.after_step()
    assert [s for s, _ in step_dirs(tmp_path / "ckpt")] == [4, 8, 9]
    assert read_latest(tmp_path / "ckpt").name == "step-9"


KILLED_WRITER = textwrap.dedent("""
    import sys, torch
    from longtrain.config import load_config
    from longtrain.parallel.mesh import ParallelDims
    from longtrain.trainer.checkpoint import Checkpointer
    from longtrain.trainer.train import TrainState
    cfg = load_config(None, ["checkpoint.dir=" + sys.argv[1], "checkpoint.async_save=false", "checkpoint.keep_last=50"])
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(8)])  # ~100 MB with Adam state
    opt = torch.optim.AdamW(model.parameters())
    state = TrainState()
    ck = Checkpointer(cfg, ParallelDims.from_config(cfg, 1), sys.argv[1], model=model, optimizer=opt, state=state)
    while True:
        state.step += 1
        with torch.no_grad():
            model[0].weight.fill_(state.step)
        ck.save(sync=True)
""")


def test_save_killed_mid_write_never_becomes_latest(tmp_path):
    root = tmp_path / "ckpt"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(root)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed_in = None
    deadline = time.time() + 120
    try:
        while time.time() < deadline and killed_in is None:
            for tmp in root.glob("step-*.tmp") if root.is_dir() else []:
                if int(tmp.name[5:-4]) >= 2 and any(tmp.glob("*.distcp")):  # shards being written
                    proc.send_signal(signal.SIGKILL)
                    killed_in = tmp
                    break
            if proc.poll() is not None:
                break
            time.sleep(0.001)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert killed_in is not None, proc.stderr.read().decode()[-2000:]
    assert killed_in.exists()
    n = int(killed_in.name[5:-4])
    assert read_latest(root).name == f"step-{n - 1}"
    assert f"step-{n}" not in [p.name for _, p in step_dirs(root)]

    cfg = load_config(None, [f"checkpoint.dir={root}"])
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(8)])
    state = TrainState()
    ck = Checkpointer(cfg, ParallelDims.from_config(cfg, 1), tmp_path, model=model,
                      optimizer=torch.optim.AdamW(model.parameters()), state=state)
    assert ck.maybe_resume().name == f"step-{n - 1}"
    assert state.step == n - 1 and float(model[0].weight[0, 0].detach()) == n - 1
    assert not killed_in.exists()  # the interrupted save is cleaned up


def _three_checkpoints(tmp_path):
    _, *objs, ck = make(tmp_path, "checkpoint.every_steps=2", "checkpoint.keep_last=5", "checkpoint.async_save=false")
    for _ in range(6):
        step(*objs)
        ck.after_step()
    return tmp_path / "ckpt"


def test_damaged_checkpoints_give_clear_errors_and_auto_falls_back(tmp_path):
    root = _three_checkpoints(tmp_path)
    shard = sorted((root / "step-6").glob("*.distcp"))[0]
    shard.unlink()
    with pytest.raises(CheckpointCorrupt, match=rf"step-6: shard file {shard.name} is missing"):
        make(tmp_path, f"checkpoint.resume={root / 'step-6'}")[-1].maybe_resume()
    with pytest.warns(UserWarning, match="is missing"):
        _, *objs, ck = make(tmp_path)
        assert ck.maybe_resume().name == "step-4"
    assert objs[-1].step == 4

    f = sorted((root / "step-4").glob("*.distcp"))[0]
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    with pytest.raises(CheckpointCorrupt, match="is truncated"):
        make(tmp_path, f"checkpoint.resume={root / 'step-4'}")[-1].maybe_resume()
    (root / "step-2" / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=r"no usable checkpoint.*missing.*truncated.*did not finish"):
        with pytest.warns(UserWarning):
            make(tmp_path)[-1].maybe_resume()


def test_checkpoint_of_another_model_shape_is_an_error_naming_both(tmp_path):
    root = _three_checkpoints(tmp_path)
    with pytest.raises(CheckpointMismatch, match=r"model.vocab_size: checkpoint 64, this run 128"):
        make(tmp_path, "model.vocab_size=128")[-1].maybe_resume()  # auto does not fall back on this
    with pytest.raises(CheckpointMismatch, match=r"model.ffn_dim: checkpoint 64, this run 96"):
        make(tmp_path, "model.ffn_dim=96", f"checkpoint.resume={root / 'step-2'}")[-1].maybe_resume()


def test_signal_saves_at_the_next_step_and_exits_with_the_requeue_code(tmp_path):
    _, *objs, ck = make(tmp_path)
    handlers = SaveOnSignal(ck.request_save)
    try:
        step(*objs)
        ck.after_step()
        assert not step_dirs(tmp_path / "ckpt")
        step(*objs)
        os.kill(os.getpid(), signal.SIGUSR1)
        with pytest.raises(CheckpointedExit) as e:
            ck.after_step()
        assert e.value.code == EXIT_CODE_CHECKPOINTED
        assert read_latest(tmp_path / "ckpt").name == "step-2"
    finally:
        handlers.restore()
    ck.request_save()  # no exit: saves (async) and continues
    step(*objs)
    ck.after_step()
    ck.wait()
    assert read_latest(tmp_path / "ckpt").name == "step-3"


def test_first_ctrl_c_requests_a_save_and_exit_the_second_interrupts_and_restore_puts_handlers_back():
    before = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)]
    requests = []
    handlers = SaveOnSignal(lambda exit_after=False: requests.append(exit_after))
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert requests == [True]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs between bytecodes; this one does not return
        os.kill(os.getpid(), signal.SIGTERM)
        assert requests == [True, True]
    finally:
        handlers.restore()
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)] == before


def test_rollback_restores_weights_but_not_the_data_position(tmp_path):
    _, model, opt, sched, loader, state, ck = make(tmp_path, "checkpoint.every_steps=2", "checkpoint.async_save=false")
    for _ in range(2):
        step(model, opt, sched, loader, state)
        ck.after_step()
    w = model.tok_embeddings.weight.detach().clone()
    step(model, opt, sched, loader, state)
    ck.rollback("step 3: non-finite loss")
    assert state.step == 2 and loader.consumed == 3 and torch.equal(model.tok_embeddings.weight, w)


def test_cli_list_inspect_consolidate(tmp_path, capsys):
    from longtrain.cli import main

    root = _three_checkpoints(tmp_path)
    assert main(["ckpt", "list", str(root)]) == 0
    out = capsys.readouterr().out
    assert "* step-6" in out and "step-2" in out and "world_size=1" in out
    assert main(["ckpt", "inspect", str(root)]) == 0
    out = capsys.readouterr().out
    assert "step 6" in out and "model.tok_embeddings.weight" in out and "(64, 32)" in out
    assert main(["ckpt", "consolidate", str(root / "step-4"), str(tmp_path / "one.pt")]) == 0
    sd = torch.load(tmp_path / "one.pt", weights_only=False)
    assert sd["model"]["tok_embeddings.weight"].shape == (64, 32) and "optimizer" in sd
    (root / "step-2" / ".metadata").unlink()
    assert main(["ckpt", "inspect", str(root / "step-2")]) == 2
    assert "did not finish" in capsys.readouterr().err
