"""One process in bf16 computes in the precision of many: FSDP2 on a one-rank mesh.

Without it one GPU ran fp32 weights under bf16 autocast, so the residual stream -- every saved or
offloaded layer input -- was fp32, twice the bytes of a multi-GPU FSDP run (``parallel.fsdp``).
Checked on CPU with gloo:

- the one-process model is an ``FSDPModule`` whose blocks see a bf16 residual stream, and the
  planner counts 2 bytes per stream element for it; ``parallel.param_dtype=fp32`` restores plain
  fp32 weights and a fp32 stream (4 bytes);
- the trainer on one process and on two FSDP ranks (``dp_shard=2``, the same global batch) give the
  same first-step loss (relative 1e-5; seen 7e-8) and gradient norm (2e-4; seen 2e-5), while the
  fp32-weights run differs from both by more than 5e-5 (seen 1.8e-4), so the comparison can tell
  the two precisions apart;
- a checkpoint written by the one-rank run resumes bit-exactly in one process;
- tensor or pipeline parallelism alone (no data-parallel peers) is wrapped the same way, over the
  one-rank ``dp_shard_sp`` mesh: tp=2 sees a bf16 stream, pp=2 gives the one-process bf16 loss
  (relative 1e-5; seen 0 at step 1) while its fp32-weights run differs (seen 1.8e-4), tp=2 in bf16
  stays closer to the one-process bf16 losses than tp=2 with fp32 weights does (seen 9e-5 vs
  2.9e-4 at step 1, 2e-4 vs 3e-3 at step 2), and a tp=2 bf16 checkpoint resumes bit-exactly in
  tp=2 and loads into one process.
"""

from __future__ import annotations

import pytest
import torch

from dist_utils import run_distributed
from test_launch_common import train_worker

TINY = ["tiny-llama", "model.n_heads=4", "model.n_kv_heads=2", "data.seq_len=128", "data.batch_size=2",
        "schedule.warmup_steps=1", "schedule.device=cpu", "schedule.dtype=bf16", "schedule.eval_every=0",
        "logging.progress=false", "logging.log_every=1", "checkpoint.save_final=false"]


def _stream_dtypes(param_dtype: str, *extra: str):
    from torch.distributed.fsdp import FSDPModule

    from longtrain.config import load_config
    from longtrain.memory.planner import layout_from
    from longtrain.memory.step_memory import residual_bytes
    from longtrain.models import build_model
    from longtrain.parallel.mesh import init_distributed
    from longtrain.parallel.parallelize import parallelize

    cfg = load_config("tiny-llama", ["schedule.device=cpu", "schedule.dtype=bf16", "data.seq_len=64",
                                     f"parallel.param_dtype={param_dtype}", *extra])
    dims = init_distributed(cfg)
    torch.manual_seed(0)
    model = parallelize(build_model(cfg.model), dims, cfg)
    seen = []
    for block in model.layers.values():
        block.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    torch.manual_seed(1)  # the same tokens on every rank (tensor parallelism reads them all)
    tokens = torch.randint(0, cfg.model.vocab_size, (1, 64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(tokens).float().sum().backward()
    return (dims.world_size, dims.one_rank_fsdp, isinstance(model, FSDPModule), sorted(set(map(str, seen))),
            residual_bytes(cfg, layout_from(cfg, dims), 2))


def test_one_process_in_bf16_is_fsdp_on_one_rank_with_a_bf16_stream():
    [bf16] = run_distributed(_stream_dtypes, 1, "auto", init_process_group=False)
    assert bf16 == (1, True, True, ["torch.bfloat16"], 2)
    [fp32] = run_distributed(_stream_dtypes, 1, "fp32", init_process_group=False)
    assert fp32 == (1, False, False, ["torch.float32"], 4)


def _train(tmp_path, name, *extra, nproc=1, steps=2):
    return train_worker(tmp_path / name, *TINY, f"schedule.steps={steps}", *extra, nproc=nproc)


def rel(a, b, key: str) -> float:
    """Relative difference of the first-step ``key`` of two runs' metric rows."""
    return abs(a[0][key] - b[0][key]) / abs(b[0][key])


def test_one_process_matches_two_fsdp_ranks_in_bf16_and_differs_from_fp32_weights(tmp_path):
    one, log = _train(tmp_path, "one")
    assert "FSDP2 on one rank" in log
    many, _ = _train(tmp_path, "many", "data.batch_size=1", nproc=2)
    plain, log32 = _train(tmp_path, "fp32", "parallel.param_dtype=fp32")
    assert "FSDP2 on one rank" not in log32
    assert rel(one, many, "loss") < 1e-5, (one[0], many[0])
    assert rel(one, many, "grad_norm") < 2e-4, (one[0], many[0])
    assert rel(plain, many, "loss") > 5e-5 and rel(plain, one, "loss") > 5e-5, (plain[0], one[0])


def test_one_rank_bf16_checkpoint_resumes_bit_exactly(tmp_path):
    ck = tmp_path / "ck"
    full, _ = _train(tmp_path, "full", f"checkpoint.dir={ck}", "checkpoint.every_steps=2", steps=4)
    assert (ck / "step-2").is_dir()
    # a fresh process resumes from step 2 (the newest checkpoint below 4 is removed first)
    import shutil
    shutil.rmtree(ck / "step-4", ignore_errors=True)
    resumed, log = _train(tmp_path, "resumed", f"checkpoint.dir={ck}", "checkpoint.every_steps=2", steps=4)
    assert "step-2" in log
    assert [r["loss"] for r in resumed if r["step"] > 2] == [r["loss"] for r in full if r["step"] > 2]


def test_tensor_parallel_alone_in_bf16_is_fsdp_on_one_rank_with_a_bf16_stream():
    bf16 = run_distributed(_stream_dtypes, 2, "auto", "parallel.tp=2", init_process_group=False)
    assert bf16 == [(2, True, True, ["torch.bfloat16"], 2)] * 2
    fp32 = run_distributed(_stream_dtypes, 2, "fp32", "parallel.tp=2", init_process_group=False)
    assert fp32 == [(2, False, False, ["torch.float32"], 4)] * 2


def test_pipeline_alone_in_bf16_matches_one_process_and_differs_from_fp32_weights(tmp_path):
    pp = ["parallel.pp=2", "parallel.pp_microbatches=2"]
    one, _ = _train(tmp_path, "one")
    staged, log = _train(tmp_path, "pp2", *pp, nproc=2)
    assert "FSDP2 on one rank" in log
    staged32, log32 = _train(tmp_path, "pp2_fp32", *pp, "parallel.param_dtype=fp32", nproc=2)
    assert "FSDP2 on one rank" not in log32
    assert rel(staged, one, "loss") < 1e-5 and rel(staged, one, "grad_norm") < 2e-4, (staged[0], one[0])
    assert rel(staged32, one, "loss") > 5e-5, (staged32[0], one[0])


def test_tensor_parallel_alone_in_bf16_tracks_one_process_and_resumes(tmp_path):
    ck = tmp_path / "ck"
    one, _ = _train(tmp_path, "one", steps=4)
    tp, log = _train(tmp_path, "tp2", "parallel.tp=2", f"checkpoint.dir={ck}", "checkpoint.every_steps=2",
                     nproc=2, steps=4)
    assert "FSDP2 on one rank" in log
    tp32, _ = _train(tmp_path, "tp2_fp32", "parallel.tp=2", "parallel.param_dtype=fp32", nproc=2, steps=4)
    # bf16 under tp sums its row-parallel partial products in another order than one process, so
    # the two bf16 runs are not equal; fp32 weights (and an fp32 stream) move further away
    for step in (0, 1):
        d_bf16 = abs(tp[step]["loss"] - one[step]["loss"])
        d_fp32 = abs(tp32[step]["loss"] - one[step]["loss"])
        assert d_bf16 < 0.5 * d_fp32 and d_bf16 < 1e-3 * abs(one[step]["loss"]), (step, tp[step], tp32[step], one[step])
    # resume from step 2 in tp=2 (bit-exact) and in one process (the same weights, one-process bf16 math)
    import shutil
    shutil.rmtree(ck / "step-4", ignore_errors=True)
    again, log = _train(tmp_path, "tp2_again", "parallel.tp=2", f"checkpoint.dir={ck}", "checkpoint.every_steps=0",
                        nproc=2, steps=4)
    assert "step-2" in log
    assert [r["loss"] for r in again if r["step"] > 2] == [r["loss"] for r in tp if r["step"] > 2]
    alone, log = _train(tmp_path, "one_from_tp2", f"checkpoint.dir={ck}", "checkpoint.every_steps=0", steps=4)
    assert "step-2" in log
    for a, b in zip([r for r in alone if r["step"] > 2], [r for r in tp if r["step"] > 2]):
        assert abs(a["loss"] - b["loss"]) < 1e-3 * abs(b["loss"]), (a, b)
