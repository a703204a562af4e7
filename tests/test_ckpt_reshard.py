"""Resharding on load: a checkpoint written by dp_shard=2 x sp=2 (FSDP2 + Ulysses, 4 gloo ranks)
loads into tp=2 x sp=2 and into one process with bitwise the same weights and optimizer state,
and the loaded models give the same loss and logits on a fixed batch."""

from __future__ import annotations

import io

import pytest
import torch

from dist_utils import run_distributed

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
MODEL = ["model.arch=llama", "model.vocab_size=64", "model.dim=32", "model.n_heads=4", "model.n_kv_heads=2",
         "model.ffn_dim=64", "model.n_layers=2", "model.max_seq_len=64"]


def make_config(ckpt_dir: str, parallel: dict):
    from longtrain.config import load_config

    over = MODEL + ["data.seq_len=32", "data.batch_size=2", "schedule.device=cpu", "parallel.backend=gloo",
                    "parallel.param_dtype=fp32", "parallel.dp_shard=-1", f"checkpoint.dir={ckpt_dir}"]
    return load_config(None, over + [f"parallel.{k}={v}" for k, v in parallel.items()])


def batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 64, (4, 32), generator=g)
    return {"tokens": tokens, "labels": tokens.roll(-1, 1), "position_ids": torch.arange(32).expand(4, 32)}


def local(b: dict, dims) -> dict:
    rows, cols = 4 // dims.dp_size, 32 // dims.sp_size
    return {k: v[dims.dp_rank * rows:(dims.dp_rank + 1) * rows, dims.sp_rank * cols:(dims.sp_rank + 1) * cols]
            for k, v in b.items()}


def build(ckpt_dir: str, parallel: dict):
    from longtrain.models import build_model
    from longtrain.parallel import init_distributed, parallelize
    from longtrain.trainer.checkpoint import Checkpointer
    from longtrain.trainer.train import TrainState

    cfg = make_config(ckpt_dir, parallel)
    dims = init_distributed(cfg)
    torch.manual_seed(1)
    model = parallelize(build_model(cfg.model), dims, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = TrainState()
    return dims, model, opt, state, Checkpointer(cfg, dims, ckpt_dir, model=model, optimizer=opt, state=state)


def loss_sum(model, dims, b) -> torch.Tensor:
    b = local(b, dims)
    return model(b["tokens"], b["position_ids"], labels=b["labels"])


def outputs(model, opt, dims) -> bytes | None:
    """Full weights + optimizer state (gathered), and the loss on a fixed batch."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from longtrain.parallel import all_reduce_sum

    with torch.no_grad():
        loss = all_reduce_sum(loss_sum(model, dims, batch(99)).detach(), dims).item()
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dims.rank != 0:
        return None
    logits = None
    if dims.world_size == 1:
        with torch.no_grad():
            logits = model(batch(99)["tokens"])
    out = {"loss": loss, "logits": logits, "model": {k: v.clone() for k, v in msd.items()},
            "optim": {k: {n: t.clone() for n, t in s.items() if isinstance(t, torch.Tensor)}
                      for k, s in osd["state"].items()}}
    # as bytes: tensors sent through a multiprocessing queue share memory with a process that exits
    buf = io.BytesIO()
    torch.save(out, buf)
    return buf.getvalue()


def unpack(b: bytes) -> dict:
    return torch.load(io.BytesIO(b), weights_only=False)


def train_and_save(ckpt_dir: str, parallel: dict):
    from longtrain.parallel import all_reduce_sum

    dims, model, opt, state, ck = build(ckpt_dir, parallel)
    for s in range(2):
        b = batch(s)
        n = all_reduce_sum((local(b, dims)["labels"] >= 0).sum(), dims)
        (loss_sum(model, dims, b) / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        state.step += 1
    ck.save(sync=True)
    return outputs(model, opt, dims)


def load(ckpt_dir: str, parallel: dict):
    dims, model, opt, state, ck = build(ckpt_dir, parallel)
    assert ck.maybe_resume() is not None and state.step == 2
    return outputs(model, opt, dims)


def plain_logits(weights: dict) -> torch.Tensor:
    from longtrain.models import build_model

    cfg = make_config("", {})
    model = build_model(cfg.model).eval()
    model.load_state_dict(weights)
    with torch.no_grad():
        return model(batch(99)["tokens"])


def same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        if isinstance(a[k], dict):
            same(a[k], b[k], f"{what}.{k}")
        else:
            assert torch.equal(a[k], b[k]), f"{what}.{k} differs"


def test_dp_shard_sp_checkpoint_loads_into_tp_sp_and_one_process(tmp_path):
    d = str(tmp_path / "ckpt")
    saved = unpack(run_distributed(train_and_save, 4, d, {"dp_shard": 2, "sp": 2})[0])
    as_tp = unpack(run_distributed(load, 4, d, {"tp": 2, "sp": 2, "dp_shard": 1})[0])
    one = unpack(load(d, {}))
    for got, name in ((as_tp, "tp=2 x sp=2"), (one, "one process")):
        same(got["model"], saved["model"], f"{name} model")
        same(got["optim"], saved["optim"], f"{name} optimizer")
        assert got["loss"] == pytest.approx(saved["loss"], rel=1e-6), name
    assert torch.equal(one["logits"], plain_logits(saved["model"]))  # the written weights' logits
