"""Layouts at cluster scale: the mesh a job of N nodes x G GPUs should use at one sequence length.

Owns: ``cluster_layouts`` (the layouts weighed: tensor and sequence parallel inside a node,
pipeline and data parallel across nodes, every size the mesh accepts for the model),
``plan_cluster`` (each layout's planner result) and ``format_cluster`` (what ``longtrain plan
--nodes`` prints). Memory per GPU and the step time come from ``memory.planner`` (its
``memory.step_memory`` estimates) and ``memory.step_time`` unchanged -- the step-time model knows the node (``Rates.gpus_per_node``) and
prices a collective at NVLink speed inside it and at ``Rates.inter_node`` across -- so this module
only enumerates layouts and ranks them.

The idea: every data-parallel rank trains ``data.batch_size`` sequences of ``data.seq_len`` tokens
per step (Ulysses and tensor-parallel ranks share theirs), so a layout moves dp x batch x seq_len
tokens per step. The recommendation is the layout with the most tokens per second per GPU among
those where some memory policy fits, each at the fastest policy that fits (``planner.plan``).
Layouts within ``planner.TIE_FRACTION`` of the best are ties, broken toward less model splitting
(smaller tp x pp), then less memory machinery (``planner.machinery``: offload, tiling), then a
smaller sp, since the time model's error is a few percent.

Where each dimension goes (the mesh orders tp innermost, then sp, dp_shard, dp_replicate, pp):
tp x sp divides G, so both live inside a node; pp divides N, so stages are whole groups of
nodes; dp_shard is either all the data-parallel ranks (FSDP across nodes) or those inside a node
(HSDP: shards inside, replicas across). ``sp_across_nodes`` lets Ulysses span nodes as well, as
ALST runs it (sp=32 on 4 nodes); its all-to-all then runs at the inter-node rate.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

from longtrain.config import Config, ConfigError
from longtrain.memory.planner import GiB, TIE_FRACTION, Plan, layout_from, machinery, plan, usable
from longtrain.memory.step_time import H200, Rates
from longtrain.models.costs import count_params, flops_per_token
from longtrain.trainer.metrics import GPU_PEAK_BF16

PEAK_BF16 = GPU_PEAK_BF16["H200"]  # the datasheet's dense bf16 rate: the MFU convention of docs/performance.md


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def cluster_layouts(cfg: Config, nodes: int, gpus_per_node: int, sp_across_nodes: bool = False) -> list[dict]:
    """Mesh sizes for nodes x gpus_per_node GPUs that the mesh accepts for ``cfg.model``."""
    world = nodes * gpus_per_node
    blocks = count_params(cfg.model)["n_blocks"]  # a pipeline stage needs at least one block
    out, seen = [], set()
    for tp in _divisors(gpus_per_node):
        for sp in _divisors(world // tp if sp_across_nodes else gpus_per_node // tp):
            for pp in _divisors(nodes):
                if (world // (tp * sp)) % pp or pp > blocks:
                    continue
                dp = world // (tp * sp * pp)
                inside = max(1, gpus_per_node // (tp * sp))
                for dp_shard in {dp, inside if dp % inside == 0 else dp}:
                    sizes = {"tp": tp, "sp": sp, "pp": pp, "dp_shard": dp_shard, "dp_replicate": dp // dp_shard}
                    key = tuple(sorted(sizes.items()))
                    if key in seen:
                        continue
                    seen.add(key)
                    try:
                        layout_from(cfg, sizes)  # the mesh's own checks (heads, layers, lengths)
                    except ConfigError:
                        continue
                    out.append(sizes)
    return out


@dataclass
class LayoutPlan:
    sizes: dict
    plan: Plan

    @property
    def fits(self) -> bool:
        return self.plan.chosen is not None

    def tokens_per_step(self, cfg: Config) -> int:
        return self.sizes["dp_shard"] * self.sizes["dp_replicate"] * cfg.data.batch_size * cfg.data.seq_len

    def tokens_per_s_per_gpu(self, cfg: Config) -> float:
        world = self.plan.layout.world_size
        return self.tokens_per_step(cfg) / self.plan.chosen.time.total / world if self.fits else 0.0

    def mfu(self, cfg: Config, causal: bool = True) -> float:
        """Model FLOPs per GPU per second over ``PEAK_BF16``; ``causal=False`` counts the whole
        score matrix (Megatron's convention, docs/performance.md's "MFU")."""
        return self.tokens_per_s_per_gpu(cfg) * flops_per_token(cfg.model, cfg.data.seq_len, causal) / PEAK_BF16

    def describe(self) -> str:
        s = self.sizes
        return f"tp={s['tp']} sp={s['sp']} pp={s['pp']} dp_shard={s['dp_shard']} dp_replicate={s['dp_replicate']}"


def cluster_rates(gpus_per_node: int, intra_gbps: float | None = None, inter_gbps: float | None = None,
                  base: Rates = H200) -> Rates:
    """``base`` with the node's size and, where given, its links (GB/s per GPU)."""
    over = {"gpus_per_node": gpus_per_node}
    if intra_gbps:
        over["all_to_all"] = intra_gbps * 1e9
    if inter_gbps:
        over["inter_node"] = inter_gbps * 1e9
    return dataclasses.replace(base, **over)


def _splitting(lp: LayoutPlan) -> tuple:
    """Least model splitting first (tp x pp), then the least memory machinery, then the smallest sp."""
    s = lp.sizes
    return (s["tp"] * s["pp"], machinery(lp.plan.chosen.policy), s["sp"])


def plan_cluster(cfg: Config, nodes: int, gpus_per_node: int, rates: Rates,
                 sp_across_nodes: bool = False) -> tuple[list[LayoutPlan], LayoutPlan | None]:
    """Every layout's plan (fitting ones fastest per GPU first) and the recommended one (None when
    no layout fits). ``cfg.memory`` is planned as ``memory.policy=auto`` whatever it says."""
    cfg = copy.deepcopy(cfg)
    cfg.memory.policy = "auto"
    rows = [LayoutPlan(sizes, plan(cfg, sizes, rates))
            for sizes in cluster_layouts(cfg, nodes, gpus_per_node, sp_across_nodes)]
    rows.sort(key=lambda r: (not r.fits, -r.tokens_per_s_per_gpu(cfg), r.plan.rows[-1].gpu_total))
    fitting = [r for r in rows if r.fits]
    if not fitting:
        return rows, None
    best = fitting[0].tokens_per_s_per_gpu(cfg)
    ties = [r for r in fitting if r.tokens_per_s_per_gpu(cfg) >= best * (1 - TIE_FRACTION)]
    return rows, min(ties, key=_splitting)


def format_cluster(cfg: Config, nodes: int, gpus_per_node: int, rates: Rates, rows: list[LayoutPlan],
                   chosen: LayoutPlan | None, limit: int = 12) -> str:
    m = cfg.model
    world = nodes * gpus_per_node
    lines = [f"{nodes} node(s) x {gpus_per_node} GPUs = {world}; seq_len {cfg.data.seq_len} "
             f"({cfg.data.seq_len / 2**20:.3g}M), batch {cfg.data.batch_size} per data-parallel rank; model "
             f"{m.arch} dim={m.dim} layers={m.n_layers} heads={m.n_heads}/{m.n_kv_heads}",
             f"links: {rates.all_to_all / 1e9:g} GB/s per GPU inside a node (measured all-to-all, 2xH200), "
             f"{rates.inter_node / 1e9:g} GB/s per GPU across nodes; GPU budget "
             f"{usable(rows[0].plan.budget) / GiB:.1f} GiB usable, host {rows[0].plan.host_budget / GiB:g} GiB "
             f"per rank" if rows else "no layout the mesh accepts for this model and GPU count", ""]
    head = f"{'layout':52s} {'policy':40s} {'GPU GiB':>8s} {'host GiB':>8s} {'step s':>9s} {'tok/s/GPU':>10s} {'MFU c/nc':>13s}"
    lines.append(head)
    for r in rows[:limit]:
        if r.fits:
            e = r.plan.chosen
            lines.append(f"{r.describe():52s} {e.policy.name[:40]:40s} {e.gpu_total / GiB:8.1f} "
                         f"{e.host_total / GiB:8.1f} {e.time.total:9.2f} {r.tokens_per_s_per_gpu(cfg):10.1f} "
                         f"{r.mfu(cfg):6.1%} {r.mfu(cfg, causal=False):6.1%}" + ("  <- recommended" if r is chosen else ""))
        else:
            lean = min(r.plan.rows, key=lambda e: e.gpu_total)
            lines.append(f"{r.describe():52s} {'nothing fits; leanest ' + lean.policy.name[:18]:40s} "
                         f"{lean.gpu_total / GiB:8.1f} {lean.host_total / GiB:8.1f} {'-':>9s} {'-':>10s} {'-':>13s}")
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more layouts")
    if chosen is not None:
        s = chosen.sizes
        e = chosen.plan.chosen
        terms = ", ".join(f"{k} {v:.2f}" for k, v in e.time.terms.items())
        lines += ["", f"recommended: parallel.tp={s['tp']} parallel.sp={s['sp']} parallel.pp={s['pp']} "
                      f"parallel.dp_shard={s['dp_shard']} parallel.dp_replicate={s['dp_replicate']} with "
                      f"{e.policy.name}", f"its step by term (s): {terms}"]
    else:
        lines += ["", "no layout fits: shorten data.seq_len, add nodes, or raise the budgets (--gpu-gb, --host-gb)"]
    lines.append("memory per GPU: memory.planner; step time: memory.step_time (H200 kernel rates fitted to "
                 "docs/performance.md; error: longtrain plan --check-time); ranked by tokens/s per GPU; MFU "
                 "against 989 TFLOP/s, causal / non-causal attention count.")
    return "\n".join(lines)
