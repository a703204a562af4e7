"""The step-time model: how long one training step takes under a memory policy, before running it.

Owns: ``Rates`` (the measured kernel and link rates the model uses), ``step_time`` (seconds of one
step for a config, a layout and a policy, by term) and ``MEASURED`` (the steps measured on H200s
that the model is checked against, ``model_error``).

The planner picks, among the policies that fit the memory budgets, the one this model says is
fastest. The terms, per rank and step (T = tokens per rank, S = sequence length, L = blocks run
with a graph, t = tensor-parallel size):

    matmuls ........ 2 FLOPs per weight per token forward, twice that backward, at ``matmul``
                     (the head counts once; a looped core once per iteration)
    attention ...... causal: 2·S·T·(heads·head_dim)/t FLOPs forward per block (``models.costs``
                     prices every FLOP and weight here), backward 2.5x
                     forward (the convention the kernel rates were measured in), at the rate of
                     the kernel ``model.attn_backend`` selects
    recomputation .. what the policy runs twice: ``full`` a block's forward (attention included),
                     ``selective`` its matmuls (those it does not keep), the tiled MLP its MLP
                     forward, the tiled loss the head's forward, ``recompute_loops`` the core
                     iterations' forward once more
    all-to-all ..... Ulysses moves q, k, v and the attention output, (sp-1)/sp of them, forward,
                     backward and again in a recomputation, at ``all_to_all`` (not overlapped)
    offload ........ the bytes sent to the host in forward and back in backward at ``host_link``;
                     copies overlap compute, so only what a phase's compute cannot cover is
                     exposed, plus one block's copy that nothing precedes
    stability norms  the norms ``model.norm_placement=peri`` (two per block, over [T, d/t]) and
                     ``model.qk_norm`` (q and k per head) add, forward and backward, at ``norm``
                     elements a second (measured per block: bench/block_cost.py); the two input
                     norms every block has are inside the fitted efficiencies
    optimizer ...... AdamW over the rank's parameter shard: on the GPU it is bandwidth-bound and
                     small; on the host (optimizer or FSDP CPU offload) ``cpu_adam`` parameters a
                     second, plus the gradients' and parameters' trips over the host link

Across GPUs and nodes (the mesh orders tp innermost, then sp, dp_shard, dp_replicate, pp, so a
group fits in one node when the product of its size and the sizes inside it is at most
``gpus_per_node``; a group that does not runs at ``inter_node``, one that does at ``all_to_all``):

    tp comm ........ sequence-parallel tensor parallelism: per block and pass two all-gathers and
                     two reduce-scatters of the [T, d] stream, (t-1)/t of it each, forward,
                     backward and in a recomputation; on the critical path (not overlapped)
    dp comm ........ FSDP over dp_shard x sp: parameters gathered in forward and again in backward
                     (activation dtype), gradients reduce-scattered (parallel.reduce_dtype),
                     (n-1)/n of the stage's parameters each; HSDP adds an all-reduce of the
                     gradient shard over dp_replicate, 2(r-1)/r of it. FSDP prefetches, so only
                     what the step's compute cannot cover is exposed, plus one block's gather
    pipeline ....... 1F1B with M micro-batches (the rows of a rank's batch, at most
                     parallel.pp_microbatches): (pp-1)/M of a stage's compute idle (divided by
                     the virtual stages for interleaved schedules), plus the [T, d] activations and
                     their gradients sent between stages

The rates are the kernels' measured rates (``../shared/tools/probe_device.py`` on an H200) times
an efficiency each, fitted once to ``MEASURED`` (the norms, rotary, activation functions, casts and
launch gaps that surround the matmuls and attention kernels are not counted separately). The
model's error against every measured step is printed by ``python -m longtrain.memory.step_time``
and published in docs/performance.md; the test suite keeps it within ``MAX_ERROR``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from longtrain.models.costs import (attention_flops_per_token, block_matmul_params, core_mixer_flops_per_token,
                                    core_mixers, head_matmul_params, lora_matmul_params, reinject_params)
from longtrain.models.looped import planned_loops

GB = 1e9


@dataclass(frozen=True)
class Rates:
    """Per-GPU rates (FLOP/s, bytes/s), measured on H200 (docs/performance.md, 2026-11)."""

    matmul: float = 734e12  # bf16 GEMM, large shapes, random data
    attention: dict = field(default_factory=lambda: {
        "sdpa_cudnn": 567e12, "flex": 419e12, "sdpa_flash": 324e12, "flash_attn": 324e12,
        "sdpa": 567e12, "sdpa_math": 30e12})  # causal fwd+bwd, backward counted as 2.5x forward
    host_link: float = 55 * GB  # pinned host<->device, one direction, overlapping compute
    all_to_all: float = 261 * GB  # NCCL all-to-all between 2 H200s (NVLink), bytes sent per rank
    hbm: float = 4.3e12  # device-to-device copy, bytes read + written
    cpu_adam: float = 1.0e9  # parameters per second, DeepSpeed's CPU Adam (16 host cores)
    # the node: GPUs that share NVLink, and what one GPU sends across nodes. Default 50 GB/s: one
    # 400 Gb/s NIC per GPU (DGX H100/H200 nodes: eight ConnectX-7 at 400 Gb/s), the link rate --
    # not measured here; a collective reaches less of it. Inside a node collectives run at
    # ``all_to_all`` (measured).
    gpus_per_node: int = 8
    inter_node: float = 50 * GB
    # Peri-LN's and QK-norm's extra norms, forward + backward, elements of their inputs a second:
    # 6.5 ms per Llama-3.2-1B block at 65,536 tokens for 6,656 elements per token (bench/block_cost.py,
    # docs/performance.md 2026-12-01, third session); the kernels reach ~1/5 of HBM bandwidth
    norm: float = 67e9
    # fitted to MEASURED (see the module docstring): the share of each kernel rate a step reaches
    matmul_efficiency: float = 0.70
    # by head_dim: the kernels' rates above were measured at 128; at 64 they reach less of them
    attention_efficiency: dict = field(default_factory=lambda: {128: 0.90, 64: 0.70})


H200 = Rates()


def attention_kernel(cfg) -> str:
    """The kernel plain causal attention runs on a GPU (``models.attention.select_backend``)."""
    b = cfg.model.attn_backend
    return "sdpa_cudnn" if b == "auto" else b


MESH_INNER_TO_OUTER = ("tp", "sp", "dp_shard", "dp_replicate", "pp")  # parallel.mesh's order, reversed


def group_bandwidth(dims, names: tuple, rates: Rates) -> float:
    """Bytes/s per GPU of a collective over the mesh dimensions ``names`` (adjacent in the mesh):
    NVLink when the group's ranks share a node, else the inter-node link."""
    inner = 1
    for d in MESH_INNER_TO_OUTER:
        if d in names:
            break
        inner *= getattr(dims, d)
    span = inner * math.prod(getattr(dims, d) for d in names)
    return rates.all_to_all if span <= rates.gpus_per_node else rates.inter_node


def _mixer_flops_per_block(m, S: int) -> float:
    """Forward token-mixing FLOPs per token of the average block: softmax attention, or for a
    looped core with gated delta rule layers the unrolled mix of both (the gdn recurrence priced
    at the attention kernel's rate: an approximation, unmeasured)."""
    attn = attention_flops_per_token(m, S, causal=True)
    if m.arch == "llama" or "gdn" not in core_mixers(m):
        return attn
    loops, ends = planned_loops(m), m.n_prelude + m.n_coda
    return (ends * attn + loops * core_mixer_flops_per_token(m, S, True)) / (ends + loops * m.n_core)


def _blocks(m, pp: int) -> dict:
    """Blocks on the busiest pipeline stage: run forward, run with a graph, of them in a looped
    core (whose iterations ``recompute_loops`` recomputes once more)."""
    if m.arch == "llama":
        n = math.ceil(m.n_layers / pp)
        return {"forward": n, "graph": n, "core": 0}
    loops = planned_loops(m)
    graph_iters = min(loops, m.backprop_loops or loops)
    ends = m.n_prelude + m.n_coda
    return {"forward": math.ceil((ends + m.n_core * loops) / pp),
            "graph": math.ceil((ends + m.n_core * graph_iters) / pp),
            "core": math.ceil(m.n_core * graph_iters / pp)}


@dataclass
class StepTime:
    terms: dict  # term -> seconds
    ideal: float  # the same step with no recomputation, no communication, no offload: the floor

    @property
    def total(self) -> float:
        return float(sum(self.terms.values()))


def step_time(cfg, dims, pol, host_bytes: float, params_per_rank: float, act_bytes: int,
              rates: Rates = H200) -> StepTime:
    """Seconds of one step of ``cfg`` on the layout ``dims`` under policy ``pol``.

    ``host_bytes``: what the policy offloads per rank (the planner's estimate of the offloaded
    activations), moved once each way; ``params_per_rank``: the rank's parameter shard;
    ``act_bytes``: bytes of an activation element (``memory.step_memory.act_bytes``).
    """
    m = cfg.model
    t, s = dims.tp, dims.sp
    S = cfg.data.seq_len
    T = cfg.data.batch_size * S / s * cfg.schedule.grad_accum
    mm_rate = rates.matmul * rates.matmul_efficiency
    at_rate = rates.attention.get(attention_kernel(cfg), rates.attention["sdpa_cudnn"]) * \
        _by_head_dim(rates.attention_efficiency, m.head_dim)
    nb = _blocks(m, dims.pp)
    blk = block_matmul_params(m) / t
    mlp = 3 * m.dim * m.ffn_dim / t  # the part of a block the tiled MLP runs again
    head = head_matmul_params(m) / t
    # a looped core iteration's LoRA deltas and re-injection, spread over its blocks
    lora = (lora_matmul_params(m) + reinject_params(m)) / max(1, m.n_core) / t if m.arch == "looped" else 0.0
    attn_fwd = _mixer_flops_per_block(m, S) * T / t  # per block, FLOPs
    attn_time_fwd = attn_fwd / at_rate  # the rate counts fwd+bwd with bwd = 2.5x fwd: forward alone at it
    # forward of every block (graph or not), backward of the graph blocks, the head fwd + bwd
    mm_flops = 2 * T * blk * nb["forward"] + 4 * T * blk * nb["graph"] + 6 * T * head
    mm_flops += 6 * T * lora * nb["core"]
    terms = {"matmuls": mm_flops / mm_rate,
             "attention": attn_time_fwd * (nb["forward"] + 2.5 * nb["graph"])}
    ideal = terms["matmuls"] + terms["attention"]
    # ---- recomputation ------------------------------------------------------------------------
    rec = 0.0
    fwd_block_mm = 2 * T * blk / mm_rate
    if pol.recompute == "full":
        rec += nb["graph"] * (fwd_block_mm + attn_time_fwd)
    elif pol.recompute == "selective":
        kept = {"attention": 0.0, "attention+half_mm": 0.5, "attention+mm": 1.0}[pol.selective_save]
        rec += nb["graph"] * fwd_block_mm * (1 - kept)
    if pol.recompute_loops and nb["core"]:
        rec += nb["core"] * (fwd_block_mm + attn_time_fwd)
    if pol.tiled_mlp:
        rec += nb["graph"] * 2 * T * mlp / mm_rate
    if pol.tiled_loss:
        rec += 2 * T * head / mm_rate
    terms["recomputation"] = rec
    # ---- the stability options' extra norms (forward of every block, backward of the graph ones) --
    kvh = max(1, m.n_kv_heads // t)
    norm_elems = (2 * m.dim / t if m.norm_placement == "peri" else 0) + \
        ((m.n_heads / t + kvh) * m.head_dim if m.qk_norm else 0)
    if norm_elems:
        terms["stability norms"] = T * norm_elems * (nb["forward"] + nb["graph"]) / 2 / rates.norm
    # ---- Ulysses all-to-all --------------------------------------------------------------------
    if s > 1:
        a = act_bytes
        kv_t = max(1, m.n_kv_heads // t)
        kv_eff = kv_t * (s // math.gcd(kv_t, s))  # kv heads replicated to lcm(kv, sp)
        qkv = a * T * (m.n_heads / t + 2 * kv_eff) * m.head_dim
        out = a * T * m.n_heads / t * m.head_dim
        per_pass = (qkv + out) * (s - 1) / s
        passes = 2 + (1 if pol.recompute in ("full", "selective") else 0)  # fwd, bwd, recompute (q, k, v)
        bw = group_bandwidth(dims, ("sp",), rates)
        terms["all-to-all"] = nb["graph"] * per_pass * passes / bw + (nb["forward"] - nb["graph"]) * per_pass / bw
    # ---- tensor parallel (sequence-parallel): 2 all-gathers + 2 reduce-scatters per block and pass
    if t > 1:
        per_pass = 4 * (t - 1) / t * T * m.dim * act_bytes
        passes = nb["forward"] + nb["graph"] + (nb["graph"] if pol.recompute in ("full", "selective") else 0)
        terms["tp comm"] = passes * per_pass / group_bandwidth(dims, ("tp",), rates)
    # ---- activation offload: each direction overlaps the compute of its phase ------------------
    if host_bytes:
        copy = host_bytes / rates.host_link
        fwd_compute = (terms["matmuls"] / 3 + attn_time_fwd * nb["forward"])
        bwd_compute = ideal - fwd_compute + rec
        one_block = copy / max(1, nb["graph"])
        terms["offload (exposed)"] = max(0.0, copy - fwd_compute) + max(0.0, copy - bwd_compute) + 2 * one_block
    compute = sum(terms.values())
    # ---- data parallel: FSDP gathers and reduce-scatters, HSDP's replica all-reduce, prefetched --
    n_fsdp, r = dims.dp_shard * s, dims.dp_replicate
    if n_fsdp > 1 or r > 1:
        stage_params = params_per_rank * n_fsdp  # this stage's parameters on one tp rank
        reduce_b = 4 if cfg.parallel.reduce_dtype == "fp32" else 2
        dp = 0.0
        if n_fsdp > 1:
            dp += (n_fsdp - 1) / n_fsdp * stage_params * (2 * act_bytes + reduce_b) / \
                group_bandwidth(dims, ("dp_shard", "sp"), rates)
        if r > 1:
            dp += 2 * (r - 1) / r * params_per_rank * reduce_b / group_bandwidth(dims, ("dp_replicate",), rates)
        terms["dp comm (exposed)"] = max(0.0, dp - compute) + dp / max(1, nb["forward"])
    # ---- pipeline: 1F1B bubble and the stage-to-stage sends ------------------------------------
    if dims.pp > 1:
        micro = max(1, min(cfg.data.batch_size, cfg.parallel.pp_microbatches or 2 * dims.pp))
        virtual = cfg.parallel.pp_virtual_stages if cfg.parallel.pp_schedule in ("interleaved_1f1b", "zero_bubble") else 1
        sends = 2 * T * m.dim * act_bytes / group_bandwidth(dims, ("pp",), rates)
        terms["pipeline bubble"] = (dims.pp - 1) / (micro * virtual) * compute + sends
    # ---- optimizer -----------------------------------------------------------------------------
    n_local = params_per_rank
    if pol.optimizer_offload or pol.fsdp_cpu_offload:
        trips = 8 * n_local / rates.host_link  # gradients down, updated parameters up (fp32)
        if pol.fsdp_cpu_offload:  # every unit's fp32 shard copied in for its forward and backward gather
            trips += 8 * n_local / rates.host_link
        terms["optimizer"] = n_local / rates.cpu_adam + trips
    else:
        terms["optimizer"] = 28 * n_local / rates.hbm  # fused AdamW: read p, g, m, v; write p, m, v
    return StepTime({k: v for k, v in terms.items() if v}, ideal)


def _by_head_dim(table: dict, hd: int) -> float:
    """The entry for the nearest head_dim in ``table``."""
    return table[min(table, key=lambda k: abs(k - hd))]


# --------------------------------------------------------------------------------------------
# The measured steps the model is checked against
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    """One step measured on H200s (docs/performance.md): config, length, layout, policy, seconds."""

    config: str
    seq_len: int
    sp: int
    policy: dict  # Policy fields
    seconds: float
    where: str  # the section of docs/performance.md
    overrides: tuple = ()  # config overrides beyond the length and layout
    fitted: bool = True  # used to fit the efficiencies (False: measured after the fit, a true check)

    def describe(self) -> str:
        pol = ",".join(f"{k}={v}" for k, v in self.policy.items()) or "none"
        extra = " ".join(self.overrides)
        return f"{self.config}{' ' + extra if extra else ''} {self.seq_len // 1024}K sp={self.sp} {pol}"


_TL = {"tiled_loss": 1}
MEASURED = (
    # Llama-3.2-1B, one H200 ("Memory policies: step time, measured peak, planner estimate")
    Measured("llama3.2-1b", 32768, 1, {}, 1.141, "memory policies, 1B 32K"),
    Measured("llama3.2-1b", 32768, 1, {**_TL}, 1.250, "memory policies, 1B 32K"),
    Measured("llama3.2-1b", 32768, 1, {"recompute": "selective", **_TL}, 1.364, "memory policies, 1B 32K"),
    Measured("llama3.2-1b", 32768, 1, {"recompute": "full", **_TL}, 1.518, "memory policies, 1B 32K"),
    Measured("llama3.2-1b", 32768, 1, {"recompute": "full", "offload_fraction": 1.0, **_TL}, 1.520,
             "memory policies, 1B 32K"),
    Measured("llama3.2-1b", 65536, 1, {**_TL}, 3.600, "memory policies, 1B 64K"),
    Measured("llama3.2-1b", 65536, 1, {"recompute": "selective", **_TL}, 3.830, "memory policies, 1B 64K"),
    Measured("llama3.2-1b", 65536, 1, {"recompute": "full", **_TL}, 4.447, "memory policies, 1B 64K"),
    Measured("llama3.2-1b", 65536, 1, {"recompute": "full", "offload_fraction": 1.0, **_TL}, 4.455,
             "memory policies, 1B 64K"),
    # one process in bf16 ("Same policy, the two precisions"; "Long sequences on one H200")
    Measured("llama3.2-1b", 131072, 1, {"recompute": "full", **_TL}, 14.16, "one rank bf16, 128K"),
    Measured("llama3.2-1b", 131072, 1, {"recompute": "selective", **_TL}, 11.76, "one rank bf16, 128K"),
    Measured("llama3.2-1b", 262144, 1, {"recompute": "selective", **_TL}, 42.85, "long, one H200"),
    Measured("llama3.2-1b", 524288, 1, {"recompute": "full", **_TL}, 209.7, "long, one H200"),
    Measured("llama3.2-1b", 1048576, 1, {"recompute": "full", "offload_fraction": 0.25, "tiled_mlp": 1, **_TL},
             843.5, "long, one H200"),
    Measured("llama3.2-1b", 1310720, 1, {"recompute": "full", "offload_fraction": 0.45, "tiled_mlp": 1, **_TL},
             1342.3, "long, one H200"),
    # two H200s, Ulysses sp=2
    Measured("llama3.2-1b", 1048576, 2, {"recompute": "full", **_TL}, 422.2, "1M on 2 GPUs"),
    Measured("llama3-8b", 131072, 2, {"recompute": "selective", **_TL}, 22.15, "ours vs ALST, 8B 128K"),
    Measured("llama3-8b", 262144, 2, {"recompute": "full", **_TL}, 88.7, "issue 19, 8B 256K auto"),
    Measured("llama3-8b", 262144, 2, {"recompute": "selective", "offload_fraction": 1.0, **_TL}, 73.5,
             "issue 19, 8B 256K manual"),
    # measured after the fit (2026-12-01, one H200, the planner's own picks): checks, not fitted
    Measured("llama3.2-1b", 131072, 1, {"recompute": "selective", **_TL}, 11.73, "race 2026-12-01", fitted=False),
    Measured("llama3.2-1b", 262144, 1, {"recompute": "selective", **_TL}, 42.49, "race 2026-12-01", fitted=False),
    Measured("llama3.2-1b", 524288, 1, {"recompute": "selective", "tiled_mlp": 1, **_TL}, 169.33,
             "race 2026-12-01", fitted=False),
    Measured("looped-1b", 262144, 1, {"recompute": "selective", **_TL}, 52.86, "looped vs plain 2026-12-01",
             fitted=False),
    Measured("llama3.2-1b", 262144, 1, {"recompute": "selective", **_TL}, 52.53, "looped vs plain 2026-12-01",
             overrides=("model.n_layers=20",), fitted=False),
    # 2026-12-01, third session, one H200: the stability options (mean of 10 steps) and LT2
    Measured("llama3.2-1b", 65536, 1, {**_TL}, 3.448, "stability options re-measured", fitted=False),
    Measured("llama3.2-1b", 65536, 1, {**_TL}, 3.623, "stability options re-measured",
             overrides=("model.norm_placement=peri", "model.qk_norm=true", "optim.z_loss=1e-4"), fitted=False),
    Measured("looped-lt2-1b", 262144, 1, {"recompute": "selective", **_TL}, 25.83, "LT2 at 1M", fitted=False),
    Measured("looped-lt2-1b", 1048576, 1, {"recompute": "selective", "offload_fraction": 0.55, "tiled_mlp": 1, **_TL},
             347.3, "LT2 at 1M", fitted=False),
)
MAX_ERROR = 0.15  # the largest relative error the suite accepts (the fit reached 9.2%: docs/performance.md)
