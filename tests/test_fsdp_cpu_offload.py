"""``memory.fsdp_cpu_offload``: FSDP2's ``CPUOffloadPolicy`` on every unit, the planner's leanest rung.

Before, the key only changed the optimizer's constructor: no FSDP unit got the policy, so the
parameters and gradients stayed on the GPU. Checked on CPU with gloo (tiny Llama):

- every FSDP unit's parameter group carries a ``CPUOffloadPolicy``; one process in fp32 (no
  data-parallel peers, no bf16) is wrapped on a one-rank mesh for it, and the start-up line says so;
- one process in fp32 trains to the same losses and gradient norms as without it over three steps
  (relative 1e-6 and 1e-5; seen: losses equal, gradient norms 6e-8 apart -- its optimizer is
  torch's fused CPU AdamW instead of the foreach one);
- two FSDP ranks with it give the one-process losses (relative 1e-5); a checkpoint written with it
  resumes bit-exactly, and on two FSDP ranks without it continues with the same losses (1e-5);
- the planner puts it last (leaner than optimizer offload: parameters and gradients go to the
  host too) and picks it where nothing else fits.
"""

from __future__ import annotations

import shutil

from dist_utils import run_distributed
from test_launch_common import train_worker
from test_one_rank_bf16 import TINY as BF16_TINY

TINY = [a for a in BF16_TINY if a != "schedule.dtype=bf16"]  # the bf16 tests' tiny run, in fp32


def _offload_policies(*extra: str):
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule

    from longtrain.config import load_config
    from longtrain.models import build_model
    from longtrain.parallel.mesh import init_distributed
    from longtrain.parallel.parallelize import parallelize

    cfg = load_config("tiny-llama", ["schedule.device=cpu", "data.seq_len=64", *extra])
    dims = init_distributed(cfg)
    model = parallelize(build_model(cfg.model), dims, cfg)
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    kinds = sorted({type(m._get_fsdp_state()._fsdp_param_group.offload_policy).__name__ for m in units})
    return len(units), kinds, CPUOffloadPolicy.__name__


def test_every_fsdp_unit_gets_the_cpu_offload_policy():
    [(n, kinds, want)] = run_distributed(_offload_policies, 1, "memory.fsdp_cpu_offload=true",
                                         init_process_group=False)
    assert n == 5 and kinds == [want]  # four blocks and the root, all offloaded, in one fp32 process
    two = run_distributed(_offload_policies, 2, "memory.fsdp_cpu_offload=true", "parallel.dp_shard=2",
                          init_process_group=False)
    assert two == [(5, [want], want)] * 2
    [(n, kinds, _)] = run_distributed(_offload_policies, 1, "schedule.dtype=bf16", init_process_group=False)
    assert n == 5 and kinds == ["OffloadPolicy"]  # the one-rank bf16 wrapping, not offloaded


def _train(tmp_path, name, *extra, nproc=1, steps=3):
    two = ["data.batch_size=1"] if nproc > 1 else []  # the same global batch on two ranks
    return train_worker(tmp_path / name, *TINY, f"schedule.steps={steps}", *extra, *two, nproc=nproc)


def _losses(rows):
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows]


def test_one_process_trains_as_without_it_and_two_ranks_match(tmp_path):
    plain, log0 = _train(tmp_path, "plain")
    assert "FSDP2 on one rank" not in log0
    off, log = _train(tmp_path, "off", "memory.fsdp_cpu_offload=true")
    assert "FSDP2 on one rank, fp32 weights; parameters, gradients and optimizer state in host memory" in log
    assert len(off) == len(plain) == 3
    for (s1, l1, g1), (s2, l2, g2) in zip(_losses(off), _losses(plain)):
        assert s1 == s2 and abs(l1 - l2) <= 1e-6 * l2 and abs(g1 - g2) <= 1e-5 * g2, (s1, l1, l2, g1, g2)
    two, _ = _train(tmp_path, "two", "memory.fsdp_cpu_offload=true", nproc=2)
    for a, b in zip(two, plain):
        assert abs(a["loss"] - b["loss"]) / b["loss"] < 1e-5, (a, b)


def test_a_checkpoint_written_with_it_resumes_bit_exactly_and_loads_without_it(tmp_path):
    ck = tmp_path / "ck"
    opts = ["memory.fsdp_cpu_offload=true", f"checkpoint.dir={ck}", "checkpoint.every_steps=2"]
    full, _ = _train(tmp_path, "full", *opts, steps=4)
    shutil.rmtree(ck / "step-4")
    resumed, log = _train(tmp_path, "resumed", *opts[:2], "checkpoint.every_steps=0", steps=4)
    assert "step-2" in log
    assert [r["loss"] for r in resumed if r["step"] > 2] == [r["loss"] for r in full if r["step"] > 2]
    # the same checkpoint on another layout, without the offload: two FSDP ranks
    two, log = _train(tmp_path, "two", f"checkpoint.dir={ck}", "checkpoint.every_steps=0", nproc=2, steps=4)
    assert "step-2" in log
    later = [(a, b) for a, b in zip([r for r in two if r["step"] > 2], [r for r in full if r["step"] > 2])]
    assert len(later) == 2 and all(abs(a["loss"] - b["loss"]) <= 1e-5 * b["loss"] for a, b in later), later


def test_the_planner_counts_it_the_most_machinery_and_picks_it_where_nothing_else_fits():
    from longtrain.config import load_config
    from longtrain.memory.planner import candidate_policies, layout_from, longest_seq_len, machinery, plan, usable

    cfg = load_config("llama3.2-1b", ["schedule.dtype=bf16", "memory.policy=auto", "memory.host_budget_gb=100",
                                      "memory.gpu_budget_gb=16", "data.seq_len=196608"])
    lay = layout_from(cfg, 1)
    ladder = candidate_policies(cfg, lay)
    by_machinery = sorted(ladder, key=machinery)
    first = next(i for i, p in enumerate(by_machinery) if p.fsdp_cpu_offload)
    assert all(p.fsdp_cpu_offload for p in by_machinery[first:]) and not by_machinery[first].optimizer_offload
    p = plan(cfg, 1)
    assert p.chosen is not None and p.chosen.policy.fsdp_cpu_offload, p.chosen and p.chosen.policy.name
    # no optimizer-offload rung fits this length (measured on an H200 capped at 16 GiB: those
    # rungs stopped at 114,688 tokens, this one passed 245,760; docs/performance.md)
    p_opt = [r for r in p.rows if r.policy.optimizer_offload]
    assert p_opt and all(r.gpu_total > usable(p.budget) for r in p_opt)
    assert longest_seq_len(cfg, 1)[0] >= 196608
    # its GPU terms hold no parameters, gradients or optimizer state, and the host holds all three
    assert not {"parameters", "optimizer"} & set(p.chosen.gpu)
    assert {"parameters", "gradients", "optimizer"} <= set(p.chosen.host)
