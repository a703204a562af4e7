"""Layouts at cluster scale (``longtrain plan MODEL --nodes N``, ``memory.cluster``) and the step-time
model's node-aware terms (``memory.step_time``): a collective runs at NVLink speed when its group
fits in a node and at the inter-node rate when it does not; tensor parallel, data parallel and the
pipeline each cost what the module docstring says; the layouts weighed keep tp and sp inside a
node; and the recommendation for Llama-3-8B at 1M tokens fits and trains more tokens per GPU than a
layout that sends its Ulysses all-to-all across nodes."""

from __future__ import annotations

import dataclasses

import pytest

from longtrain.config import load_config
from longtrain.memory.cluster import LayoutPlan, cluster_layouts, cluster_rates, plan_cluster
from longtrain.memory.planner import layout_from, plan, sizes
from longtrain.memory.step_memory import Policy, estimate
from longtrain.memory.step_time import H200, group_bandwidth

MIB = 2**20


def _cfg(model="llama3-8b", seq=MIB, *extra):
    return load_config(model, [f"data.seq_len={seq}", "memory.gpu_budget_gb=139.8", "memory.host_budget_gb=240",
                               *extra])


def test_a_group_runs_at_nvlink_speed_inside_a_node_and_at_the_inter_node_rate_across():
    r = cluster_rates(8)
    assert group_bandwidth(sizes(sp=8), ("sp",), r) == r.all_to_all
    assert group_bandwidth(sizes(sp=16), ("sp",), r) == r.inter_node
    assert group_bandwidth(sizes(tp=2, sp=4, dp_shard=2), ("sp",), r) == r.all_to_all  # 2 x 4 ranks: one node
    assert group_bandwidth(sizes(tp=2, sp=8), ("sp",), r) == r.inter_node  # 2 x 8 ranks span two nodes
    lay = sizes(sp=8, dp_replicate=4)
    assert group_bandwidth(lay, ("dp_replicate",), r) == r.inter_node
    assert group_bandwidth(lay, ("dp_shard", "sp"), r) == r.all_to_all
    assert cluster_rates(8, inter_gbps=25).inter_node == 25e9 and cluster_rates(8, intra_gbps=400).all_to_all == 400e9


def _time(cfg, lay, rates=H200, **pol):
    lay = {"dp_shard": 1, **lay}
    return estimate(cfg, layout_from(cfg, lay), Policy(recompute="selective", tiled_loss=512, **pol), rates).time


def test_the_node_aware_terms_cost_what_the_model_says():
    cfg = _cfg(seq=256 * 1024)
    inside = _time(cfg, {"sp": 8}, cluster_rates(8))
    across = _time(cfg, {"sp": 8}, cluster_rates(4))  # the same sp=8 over two 4-GPU nodes
    ratio = across.terms["all-to-all"] / inside.terms["all-to-all"]
    assert ratio == pytest.approx(H200.all_to_all / H200.inter_node)
    links = ("all-to-all", "dp comm (exposed)")  # FSDP's group (dp_shard x sp) spans the nodes too
    assert across.terms["dp comm (exposed)"] > inside.terms["dp comm (exposed)"]
    assert {k: v for k, v in across.terms.items() if k not in links} == \
        pytest.approx({k: v for k, v in inside.terms.items() if k not in links})
    # sequence-parallel TP: 4 collectives of (t-1)/t of the [T, d] stream per block and pass
    t2 = _time(cfg, {"tp": 2})
    blocks = cfg.model.n_layers
    per_pass = 4 * 0.5 * 256 * 1024 * cfg.model.dim * 2 / H200.all_to_all
    assert t2.terms["tp comm"] == pytest.approx(3 * blocks * per_pass)  # forward, backward, recomputation
    # one sequence per rank: a 1F1B pipeline has one micro-batch, so pp-1 stages' worth sits idle
    p2 = _time(cfg, {"pp": 2}, cluster_rates(4), tiled_mlp=0)
    compute = sum(v for k, v in p2.terms.items() if k not in ("pipeline bubble", "optimizer", "dp comm (exposed)"))
    assert p2.terms["pipeline bubble"] == pytest.approx(compute, rel=0.01)
    # HSDP across nodes: the replica all-reduce shows only where compute cannot hide it
    hsdp = _time(_cfg(seq=8192), {"dp_shard": 8, "dp_replicate": 2}, cluster_rates(8, inter_gbps=0.5))
    fast = _time(_cfg(seq=8192), {"dp_shard": 8, "dp_replicate": 2}, cluster_rates(8))
    assert hsdp.terms["dp comm (exposed)"] > 10 * fast.terms["dp comm (exposed)"]


def test_layouts_keep_tp_and_sp_inside_a_node_and_pp_across_whole_nodes():
    cfg = _cfg()
    lays = cluster_layouts(cfg, nodes=8, gpus_per_node=8)
    assert lays and all(8 % (s["tp"] * s["sp"]) == 0 and 8 % s["pp"] == 0 for s in lays)
    assert all(s["tp"] * s["sp"] * s["pp"] * s["dp_shard"] * s["dp_replicate"] == 64 for s in lays)
    assert {"tp": 1, "sp": 8, "pp": 1, "dp_shard": 1, "dp_replicate": 8} in lays  # HSDP: replicas across nodes
    assert not any(s["sp"] > 8 for s in lays)
    across = cluster_layouts(cfg, nodes=8, gpus_per_node=8, sp_across_nodes=True)
    assert max(s["sp"] for s in across) == 32  # Llama-3-8B's 32 heads bound Ulysses


def test_llama3_8b_at_1m_tokens_on_2_nodes_gets_a_fitting_layout_faster_per_gpu_than_sp_across_nodes():
    cfg = _cfg()
    rows, chosen = plan_cluster(cfg, 2, 8, cluster_rates(8))
    assert chosen is not None and chosen.fits and len(rows) > 5
    s = chosen.sizes
    assert s["tp"] * s["sp"] <= 8 and chosen.plan.chosen.gpu_total <= chosen.plan.budget
    # the same layout with every Ulysses group split over two 4-GPU nodes pays the inter-node rate
    slow_rates = dataclasses.replace(cluster_rates(4), inter_node=5e9)
    slow = LayoutPlan(s, plan(cfg, s, slow_rates))
    assert s["sp"] > 4 and slow.fits
    assert slow.tokens_per_s_per_gpu(cfg) < chosen.tokens_per_s_per_gpu(cfg)


def test_plan_cli_prints_the_recommended_layout_and_rejects_a_bad_node_count(capsys):
    from longtrain.cli import main

    assert main(["plan", "llama3-8b", "--nodes", "1", "--seq-len", str(MIB), "--gpu-gb", "139.8",
                 "--host-gb", "240"]) == 0
    out = capsys.readouterr().out
    assert "recommended: parallel.tp=" in out and "its step by term" in out
    assert main(["plan", "llama3-8b", "--nodes", "0"]) == 2
    assert capsys.readouterr().out.strip() == "longtrain plan: --nodes=0 must be >= 1."
