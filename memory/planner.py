"""The memory planner: the policies weighed for a config and layout, and the fastest that fits.

Owns: the layout it plans for (``layout_from``: ``ParallelDims.from_config``, as the trainer
builds it; ``sizes`` for hardware not at hand), the policies weighed (``candidate_policies``, the
ladder, with the chunk sizes of ``tiling_sizes``), the budgets (``device_budget_bytes`` and
``usable``), the choice (``plan``: the fastest that fits by ``memory.step_time``'s model, ties to
the least ``machinery``), ``longest_seq_len``, ``resolve_policy`` for ``memory.policy=auto``, and
``measure_peak`` to put measurements next to the estimates.

Each policy's per-rank memory and step time are ``memory.step_memory.estimate``'s: one function
per memory term, the four moments of a step, and the formulae with their error against measured
peaks in that module's docstring; what one block saves for backward, per token and tensor, is
``memory.activations``'. The table ``longtrain plan`` prints and the time model's error against
measured steps are ``memory.plan_table``'s.

The usable GPU memory is the budget less a reserve for the CUDA context, NCCL, and allocator
fragmentation (8% + 1 GiB): the estimates count live tensors, and memory the allocator reserves
but has not handed out is not modelled beyond this reserve.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import torch

from longtrain.config import Config, ConfigError
from longtrain.memory.step_memory import Estimate, Policy, act_bytes, estimate
from longtrain.memory.step_time import H200, Rates
from longtrain.models.attention import selective_recompute_supported
from longtrain.parallel.mesh import ParallelDims

GiB = 2**30
RESERVE_FRACTION = 0.08
RESERVE_BYTES = 1 * GiB


# --------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------


def layout_from(cfg: Config, world=None) -> ParallelDims:
    """The layout to plan for, as the trainer builds it (``ParallelDims.from_config``, which is
    pure): ``world`` is the trainer's ``ParallelDims`` (returned as is), a dict of mesh sizes that
    override ``cfg.parallel``, a world size, or None for ``launch.nodes * launch.nproc_per_node``
    when ``parallel.dp_shard=-1`` (else the product of the sizes)."""
    if isinstance(world, ParallelDims):
        return world
    if isinstance(world, dict):
        cfg = copy.deepcopy(cfg)
        for k, v in world.items():
            setattr(cfg.parallel, k, int(v))
        world = None
    p = cfg.parallel
    if world is None:
        world = (cfg.launch.nodes * cfg.launch.nproc_per_node if p.dp_shard == -1
                 else p.dp_replicate * p.dp_shard * p.tp * p.sp * p.pp)
    return ParallelDims.from_config(cfg, int(world))


def sizes(dp_replicate: int = 1, dp_shard: int = 1, tp: int = 1, sp: int = 1, pp: int = 1) -> ParallelDims:
    """A mesh-less layout of these sizes, to plan for hardware one does not have at hand."""
    return ParallelDims(dp_replicate=dp_replicate, dp_shard=dp_shard, sp=sp, tp=tp, pp=pp,
                        world_size=dp_replicate * dp_shard * tp * sp * pp)


# --------------------------------------------------------------------------------------------
# The ladder and the choice
# --------------------------------------------------------------------------------------------


def tiling_sizes(cfg: Config, lay: ParallelDims) -> tuple[int, int]:
    """(MLP chunks, loss tokens per chunk): chunks of about ``dim`` tokens for the MLP (Arctic's
    choice: the intermediate then matches a [dim, ffn] weight), about 1 GiB of logits per loss chunk."""
    m = cfg.model
    T = max(1, cfg.data.batch_size * cfg.data.seq_len // lay.sp)
    mlp = max(2, math.ceil(T / m.dim))
    per_tok = m.vocab_size / lay.tp * (12 + act_bytes(cfg))
    loss = max(256, int(GiB // per_tok) // 256 * 256)
    return mlp, min(loss, T) if T >= 256 else max(1, T // 2)


# offload fractions tried, in steps of 1/20: where the host cannot take every layer input and the
# GPU cannot keep three quarters of them, the fitting fraction lies between two quarter steps
# (Llama-3-8B, 1M tokens, sp=2 on two H200s with 120 GiB of host memory each: 0.9)
OFFLOAD_STEPS = 20


def candidate_policies(cfg: Config, lay: ParallelDims) -> list[Policy]:
    """Every policy the planner weighs, least invasive first (the order breaks ties in time).

    The product of: recomputation (none, selective, full), the tiled MLP (off, on), the offload
    fraction (0, then steps of 1/``OFFLOAD_STEPS``), where the optimizer state lives (GPU, host by
    optimizer offload, host with parameters and gradients by FSDP CPU offload), and for a looped
    model ``recompute_loops`` (off, on). The tiled loss is on everywhere but in the rows with
    nothing else on, since it removes the largest tensor of a step (the [T, vocab] logits) for one
    more [T, dim] x [dim, vocab] product.
    """
    looped = cfg.model.arch == "looped"
    mlp, loss = tiling_sizes(cfg, lay)
    fractions = (0.0,) + tuple(round(k / OFFLOAD_STEPS, 4) for k in range(1, OFFLOAD_STEPS + 1))
    states = ({}, {"optimizer_offload": True}, {"fsdp_cpu_offload": True})
    out = []
    for recompute in recompute_modes(cfg):
        for tiled_mlp in (0, mlp):
            for state in states:
                for loops in ((False, True) if looped else (False,)):
                    for phi in fractions:
                        base = Policy(recompute, loops, phi, tiled_mlp, loss, **state)
                        if not (tiled_mlp or phi or state or loops):
                            out.append(dataclasses.replace(base, tiled_loss=0))
                        out.append(base)
    return out


def recompute_modes(cfg: Config) -> tuple[str, ...]:
    """none, selective, full -- without selective where the attention kernel cannot run inside it
    (``models.attention.selective_recompute_supported``: document masks on FlexAttention on a GPU)."""
    device = cfg.schedule.device if cfg.schedule.device != "auto" else \
        ("cuda" if torch.cuda.is_available() else "cpu")
    if selective_recompute_supported(cfg.model.attn_backend, device, cfg.data.doc_masking):
        return ("none", "selective", "full")
    return ("none", "full")


def device_budget_bytes(cfg: Config) -> tuple[int, str]:
    if cfg.memory.gpu_budget_gb > 0:
        return int(cfg.memory.gpu_budget_gb * GiB), f"memory.gpu_budget_gb={cfg.memory.gpu_budget_gb:g}"
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        return int(total), f"the device's {total / GiB:.1f} GiB (memory.gpu_budget_gb=0)"
    return 80 * GiB, "80 GiB (memory.gpu_budget_gb=0 and no GPU here)"


def usable(budget: int) -> int:
    return int(budget * (1 - RESERVE_FRACTION) - RESERVE_BYTES)


@dataclass
class Plan:
    layout: ParallelDims
    budget: int
    budget_desc: str
    host_budget: int
    rows: list  # Estimate per candidate
    chosen: Estimate | None  # the fastest that fits


def fits(e: Estimate, p: "Plan") -> bool:
    return e.gpu_total <= usable(p.budget) and e.host_total <= p.host_budget


# predicted step times within this fraction of the fastest are ties, and a tie goes to the policy
# with the least machinery (``machinery``): the time model's error against measured steps is a
# few percent (``time_model_error``), so a smaller predicted gain is not evidence of one
TIE_FRACTION = 0.03


def machinery(pol: Policy) -> tuple:
    """How much a policy changes the plain step, most disruptive first: state on the host, then
    activation offload, the tiled MLP, recompute_loops, the recomputation, the tiled loss. The
    offload fraction is not machinery: among tied fractions ``plan`` keeps the most GPU headroom
    (offload rows measured up to 12% above their estimate; docs/performance.md)."""
    return (pol.fsdp_cpu_offload, pol.optimizer_offload, pol.offload_fraction > 0, pol.tiled_mlp > 0,
            pol.recompute_loops, ("none", "selective", "full").index(pol.recompute), pol.tiled_loss > 0)


def plan(cfg: Config, world=None, rates: Rates = H200) -> Plan:
    """Every candidate policy's memory and step time; the chosen one is the fastest that fits the
    GPU budget (less the reserve) and the host budget, up to ``TIE_FRACTION``."""
    lay = layout_from(cfg, world)
    budget, desc = device_budget_bytes(cfg)
    host = int(cfg.memory.host_budget_gb * GiB)
    rows = [estimate(cfg, lay, p, rates) for p in candidate_policies(cfg, lay)]
    out = Plan(lay, budget, desc, host, rows, None)
    fitting = [e for e in rows if fits(e, out)]
    if fitting:
        fastest = min(e.time.total for e in fitting)
        ties = [e for e in fitting if e.time.total <= fastest * (1 + TIE_FRACTION)]
        out.chosen = min(ties, key=lambda e: (machinery(e.policy), e.gpu_total))
    return out


def longest_seq_len(cfg: Config, world=None, max_seq: int = 1 << 27) -> tuple[int, Plan | None]:
    """The longest ``data.seq_len`` for which some policy fits the budgets, and its plan.

    Lengths are multiples of 1024 x sp x tp (what the mesh checks ask for); found by doubling then
    bisection, since every policy's estimate grows with the length. (0, None) when even the unit
    does not fit.
    """
    lay = layout_from(cfg, world)
    unit = 1024 * lay.sp * lay.tp
    trial = copy.deepcopy(cfg)

    def plan_at(n_units: int) -> Plan | None:
        trial.data.seq_len = n_units * unit
        p = plan(trial, world)
        return p if p.chosen is not None else None

    best = plan_at(1)  # always the plan of ``lo``
    if best is None:
        return 0, None
    lo, hi = 1, 2
    while hi * unit <= max_seq and (p := plan_at(hi)) is not None:
        lo, hi, best = hi, hi * 2, p
    hi = min(hi, max_seq // unit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if (p := plan_at(mid)) is not None:
            lo, best = mid, p
        else:
            hi = mid
    return lo * unit, best


def resolve_policy(cfg: Config, world=None) -> Config:
    """A copy of ``cfg`` with the memory fields set to the fastest policy that fits.

    ``world``: the trainer's ``ParallelDims`` (or a dict of mesh sizes, or a world size). The
    result has ``memory.policy=manual`` so applying it twice changes nothing. Raises
    ``ConfigError`` naming the budgets when even the leanest policy does not fit.
    """
    if cfg.memory.policy != "auto":
        return cfg
    p = plan(cfg, world)
    if p.chosen is None:
        lean = p.rows[-1]
        raise ConfigError(
            f"no memory policy fits: the leanest ({lean.policy.name}) needs "
            f"{lean.gpu_total / GiB:.1f} GiB per GPU against {usable(p.budget) / GiB:.1f} GiB usable of "
            f"{p.budget_desc}, and {lean.host_total / GiB:.1f} GiB of host memory against "
            f"memory.host_budget_gb={cfg.memory.host_budget_gb:g}. Shorten data.seq_len "
            f"(={cfg.data.seq_len}) or data.batch_size, raise parallel.sp/tp/dp_shard, or raise the "
            f"budgets; `longtrain plan` shows every term.")
    out = copy.deepcopy(cfg)
    p.chosen.policy.apply_to(out.memory)
    out.memory.policy = "manual"
    return out


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def reset_peak(device=None) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def measure_peak(device=None) -> dict:
    """Peak GPU bytes allocated/reserved since ``reset_peak`` and the process's host RSS."""
    out = {"gpu_peak_allocated": None, "gpu_peak_reserved": None, "host_rss": host_rss_bytes()}
    if torch.cuda.is_available():
        torch.cuda.synchronize(device)
        out["gpu_peak_allocated"] = torch.cuda.max_memory_allocated(device)
        out["gpu_peak_reserved"] = torch.cuda.max_memory_reserved(device)
    return out


def host_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
