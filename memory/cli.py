"""``longtrain plan CONFIG [section.key=value ...]``: the memory planner's table for a config.

Owns: the ``plan`` subcommand only (``add_cli`` registers it on the main parser's subparsers);
the choice lives in ``longtrain.memory.planner``, the estimates in ``longtrain.memory.step_memory``,
the cluster layouts (``--nodes``) in ``longtrain.memory.cluster``.
"""

from __future__ import annotations

import argparse
import copy

from longtrain.cli_common import add_config_args, split_config_args
from longtrain.config import ConfigError, load_config
from longtrain.memory.cluster import cluster_rates, format_cluster, plan_cluster
from longtrain.memory.plan_table import format_plan, format_time_model_error, time_model_error
from longtrain.memory.planner import GiB, longest_seq_len, plan, resolve_policy, usable


def _plan(ns: argparse.Namespace) -> int:
    config, overrides = split_config_args(ns.args)
    if ns.gpu_gb is not None:
        overrides.append(f"memory.gpu_budget_gb={ns.gpu_gb}")
    if ns.host_gb is not None:
        overrides.append(f"memory.host_budget_gb={ns.host_gb}")
    if ns.check_time:
        print(format_time_model_error(time_model_error()))
        return 0
    if ns.seq_len is not None:
        overrides.append(f"data.seq_len={ns.seq_len}")
    cfg = load_config(config, overrides)
    if ns.nodes is not None:
        return _cluster(cfg, ns)
    if ns.longest:
        return _longest(cfg, ns.world)
    p = plan(cfg, ns.world)
    print(format_plan(cfg, p))
    if cfg.memory.policy == "auto" or p.chosen is None:
        try:
            chosen = resolve_policy(cfg if cfg.memory.policy == "auto" else _as_auto(cfg), ns.world).memory
        except ConfigError as e:
            print(f"\nlongtrain plan: {e}")
            return 1
        print(f"\nmemory.policy=auto resolves to: recompute={chosen.recompute} "
              f"recompute_loops={chosen.recompute_loops} offload={chosen.offload} "
              f"offload_fraction={chosen.offload_fraction:g} tiled_mlp={chosen.tiled_mlp} "
              f"tiled_loss={chosen.tiled_loss} optimizer_offload={chosen.optimizer_offload} "
              f"fsdp_cpu_offload={chosen.fsdp_cpu_offload}")
    return 0


def _longest(cfg, world) -> int:
    n, p = longest_seq_len(cfg, world)
    if p is None:
        print("longtrain plan --longest: not even 1024 tokens per sequence fit these budgets; raise "
              "memory.gpu_budget_gb / memory.host_budget_gb or parallel.sp/tp/dp_shard.")
        return 1
    e = p.chosen
    print(f"longest data.seq_len that fits (planner estimate, batch {cfg.data.batch_size}): {n} tokens "
          f"({n / 2**20:.3g}M) with {e.policy.name}: {e.gpu_total / GiB:.1f} of {usable(p.budget) / GiB:.1f} GiB "
          f"usable per GPU ({p.budget_desc}), {e.host_total / GiB:.1f} of {p.host_budget / GiB:g} GiB host")
    if n > cfg.model.max_seq_len:
        print(f"note: beyond model.max_seq_len={cfg.model.max_seq_len}; raise it (and the rotary scaling, if "
              f"the model needs it) to train this long")
    return 0


def _cluster(cfg, ns: argparse.Namespace) -> int:
    for flag, v in (("--nodes", ns.nodes), ("--gpus-per-node", ns.gpus_per_node)):
        if v < 1:
            print(f"longtrain plan: {flag}={v} must be >= 1.")
            return 2
    rates = cluster_rates(ns.gpus_per_node, ns.intra_gbps, ns.inter_gbps)
    rows, chosen = plan_cluster(cfg, ns.nodes, ns.gpus_per_node, rates, ns.sp_across_nodes)
    print(format_cluster(cfg, ns.nodes, ns.gpus_per_node, rates, rows, chosen))
    return 0 if chosen is not None else 1


def _as_auto(cfg):
    out = copy.deepcopy(cfg)
    out.memory.policy = "auto"
    return out


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="estimate per-GPU memory for a config and pick a memory policy",
        description="Print per-rank memory estimates (parameters, gradients, optimizer, activations, "
                    "working and communication buffers) and the estimated step time for the memory policies, "
                    "fastest first, and the one memory.policy=auto picks (the fastest that fits). CONFIG is a "
                    "YAML path or shipped config name.")
    add_config_args(p)
    p.add_argument("--gpu-gb", type=float, default=None, help="GPU budget in GiB (memory.gpu_budget_gb)")
    p.add_argument("--host-gb", type=float, default=None, help="host budget per rank (memory.host_budget_gb)")
    p.add_argument("--longest", action="store_true",
                   help="print the longest data.seq_len some memory policy fits (planner estimate)")
    p.add_argument("--check-time", action="store_true",
                   help="print the step-time model against every step measured on H200s (docs/performance.md)")
    p.add_argument("--world", type=int, default=None,
                   help="world size to resolve parallel.dp_shard=-1 (default launch.nodes*nproc_per_node)")
    c = p.add_argument_group("cluster layouts (--nodes): tp and sp inside a node, pp and dp across nodes")
    c.add_argument("--nodes", type=int, default=None,
                   help="plan every layout of NODES x --gpus-per-node GPUs and recommend the fastest per GPU that fits")
    c.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    c.add_argument("--seq-len", type=int, default=None, help="sequence length (data.seq_len)")
    c.add_argument("--intra-gbps", type=float, default=None,
                   help="GB/s per GPU inside a node (default 261: NCCL all-to-all measured on 2xH200 NVLink)")
    c.add_argument("--inter-gbps", type=float, default=None,
                   help="GB/s per GPU across nodes (default 50: one 400 Gb/s NIC per GPU, DGX H200)")
    c.add_argument("--sp-across-nodes", action="store_true",
                   help="let Ulysses span nodes too (as ALST runs sp=32 on 4 nodes)")
    p.set_defaults(func=_plan)
