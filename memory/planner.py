"""The memory planner: per-rank estimates for a config, and the cheapest policy that fits.

Owns: exact parameter counts (``count_params``), the per-rank estimate of every memory term
(``estimate``), the ladder of policies from cheapest to leanest (``candidate_policies``), the
choice (``plan``), ``resolve_policy`` for ``memory.policy=auto``, the table ``longtrain plan``
prints, and ``measure_peak`` to put measurements next to the estimates.

Notation: d = model.dim, h = n_heads, kv = n_kv_heads, hd = d/h, f = ffn_dim, V = vocab_size,
t = tp, s = sp, a = bytes of an activation element (2 for bf16, 4 for fp32). Per rank and
micro-batch a layer sees T = batch·seq/s tokens (Ulysses splits the sequence; inside attention
a rank holds all S tokens of h/s heads, which is the same byte count). Widths per token on one
rank: q and the attention output qd = d/t; keys and values kvd = kv_eff·hd with
kv_eff = kv/t, raised to s when Ulysses has to replicate kv heads; MLP f/t. Tensor parallelism
is assumed sequence-parallel (norms and residuals sharded over t, projection inputs gathered).

Saved for backward per token and layer with no recompute (what autograd keeps; bytes):

    attention_norm input (the layer input) ........ a·d/t    + 4/t (fp32 rstd)
    attention_norm output = input of wq, wk, wv ... a·d
    q, k, v (saved by attention) .................. a·(qd + 2·kvd)
    attention output = input of wo ................ a·qd     + 4·h/t (fp32 logsumexp)
    ffn_norm input ................................ a·d/t    + 4/t
    ffn_norm output = input of w1, w3 ............. a·d
    gate = w1 out (silu input), silu(gate), up = w3 out, silu(gate)·up = w2 input  4·a·f/t

    A_none = a·(2d/t + 2d + 2qd + 2kvd + 4f/t) + 4·(2 + h)/t
    (Llama-3-8B, a=2, t=s=1: 168,072 B = 164 KiB per token per layer; the rotary products save
    only the shared cos/sin tables, residual adds save nothing.)

Per policy (per token and layer):
    none ........ A_none
    selective ... a·d/t (checkpoint input) + a·qd + 4h/t (attention output and logsumexp kept);
                  ``attention+mm`` adds every matmul output a·(qd + 2kvd + 2d + 2f/t),
                  ``attention+half_mm`` half of that
    full ........ a·d/t (the checkpoint input only: 8 KiB/token for Llama-3-8B)
    recompute_loops (looped core) ... a·d/t per *iteration* instead of per core block
    offload φ ... the checkpoint inputs: (1-φ) stay on the GPU, φ go to the host
    tiled MLP ... drops the 4·a·f/t MLP intermediates from what is saved or recomputed at once;
                  one chunk's worth, 4·a·f/t·T/n, is the working set

Working buffers (transient, the largest of a step): backward of one layer holds its recomputed
activations (A_none·T for full recompute, less what is kept) plus gradient buffers
a·T·(2d + max(2f/t, qd + 2kvd)); the loss holds [T, V/t] logits: a (projection) + 4 (fp32 copy)
+ 4 (log-softmax, saved) + 4 (its gradient) bytes per element, or one chunk of c tokens with the
tiled loss. Communication: Ulysses all-to-all receive buffers a·T·(2qd + 2kvd) when s > 1;
FSDP2 all-gathers bf16 weights of two blocks (current + prefetched) and reduce-scatters one
block's fp32 gradients when parameters are sharded; without FSDP, autocast caches a bf16 copy of
every weight (2 bytes/param).

Static state per parameter (parameters are fp32, FSDP2 shards them over dp_shard·sp, tensor
parallelism over tp, the pipeline keeps ceil(L/pp) blocks plus the larger of embedding/head):
parameters 4, gradients 4, Adam m and v 8 bytes. Optimizer offload moves m, v and an fp32
master (4) and a gradient staging buffer (4) to the host; FSDP CPU offload moves parameters,
gradients and optimizer state there.

The usable GPU memory is the budget less a reserve for the CUDA context, NCCL, and allocator
fragmentation (8% + 1 GiB). These are estimates of the dominant terms, to be checked against
``measure_peak`` (bench/bench_memory.py prints both).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field

import torch

from longtrain.config import Config, ConfigError

GiB = 2**30
RESERVE_FRACTION = 0.08
RESERVE_BYTES = 1 * GiB


# --------------------------------------------------------------------------------------------
# Parameter counts
# --------------------------------------------------------------------------------------------


def block_params(m) -> int:
    kvd = m.n_kv_heads * m.head_dim
    return 2 * m.dim + 2 * m.dim * m.dim + 2 * m.dim * kvd + 3 * m.dim * m.ffn_dim


def lora_params(m) -> int:
    if m.arch != "looped" or m.lora_rank == 0:
        return 0
    kvd = m.n_kv_heads * m.head_dim
    d, f = m.dim, m.ffn_dim
    in_out = [(d, d), (d, kvd), (d, kvd), (d, d), (d, f), (f, d), (d, f)]  # models.looped.LORA_TARGETS
    return m.n_core * sum(m.loops_max * m.lora_rank * (i + o) for i, o in in_out)


def count_params(m) -> dict:
    """Exact parameter counts of ``build_model(m)`` by part (tied embeddings counted once)."""
    emb = m.vocab_size * m.dim
    head = m.dim + (0 if m.tie_embeddings else m.vocab_size * m.dim)
    n_blocks = m.n_layers if m.arch == "llama" else m.n_prelude + m.n_core + m.n_coda
    extra = lora_params(m) + (2 * m.dim * m.dim if m.arch == "looped" and m.reinject == "concat" else 0)
    blocks = n_blocks * block_params(m)
    return {"embedding": emb, "blocks": blocks, "block": block_params(m), "n_blocks": n_blocks,
            "head": head, "extra": extra, "total": emb + blocks + head + extra}


# --------------------------------------------------------------------------------------------
# Layout and policy
# --------------------------------------------------------------------------------------------


@dataclass
class Layout:
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    sp: int = 1
    pp: int = 1

    @property
    def world(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp * self.sp * self.pp

    @property
    def fsdp(self) -> int:  # parameters are sharded over dp_shard x sp (parallel.fsdp)
        return self.dp_shard * self.sp


def layout_from(cfg: Config, world=None) -> Layout:
    """Mesh sizes from a ``ParallelDims``-like object, a dict, an int world size, or the config."""
    p = cfg.parallel
    if world is not None and not isinstance(world, (int, dict)):
        return Layout(*(int(getattr(world, k)) for k in ("dp_replicate", "dp_shard", "tp", "sp", "pp")))
    if isinstance(world, dict):
        return Layout(**{k: int(world.get(k, getattr(p, k))) for k in ("dp_replicate", "dp_shard", "tp", "sp", "pp")})
    others = p.dp_replicate * p.tp * p.sp * p.pp
    if p.dp_shard == -1:
        n = world if isinstance(world, int) else cfg.launch.nodes * cfg.launch.nproc_per_node
        if n % others:
            raise ConfigError(f"world size {n} is not divisible by dp_replicate*tp*sp*pp={others}.")
        dp_shard = max(1, n // others)
    else:
        dp_shard = p.dp_shard
    return Layout(p.dp_replicate, dp_shard, p.tp, p.sp, p.pp)


@dataclass(frozen=True)
class Policy:
    recompute: str = "none"
    recompute_loops: bool = False
    offload_fraction: float = 0.0  # 0 = offload off
    tiled_mlp: int = 0
    tiled_loss: int = 0
    optimizer_offload: bool = False
    fsdp_cpu_offload: bool = False
    selective_save: str = "attention"

    @property
    def name(self) -> str:
        parts = [self.recompute if self.recompute != "none" else "none"]
        if self.recompute_loops:
            parts.append("loops")
        if self.offload_fraction:
            parts.append(f"offload{self.offload_fraction:g}")
        if self.tiled_mlp:
            parts.append(f"mlp/{self.tiled_mlp}")
        if self.tiled_loss:
            parts.append(f"loss/{self.tiled_loss}")
        if self.optimizer_offload:
            parts.append("optim-cpu")
        if self.fsdp_cpu_offload:
            parts.append("fsdp-cpu")
        return "+".join(parts)

    def apply_to(self, mem) -> None:
        mem.recompute = self.recompute
        mem.recompute_layers = []
        mem.selective_save = self.selective_save
        mem.recompute_loops = self.recompute_loops
        mem.offload = self.offload_fraction > 0
        mem.offload_fraction = self.offload_fraction if self.offload_fraction > 0 else 1.0
        mem.tiled_mlp = self.tiled_mlp
        mem.tiled_loss = self.tiled_loss
        mem.optimizer_offload = self.optimizer_offload
        mem.fsdp_cpu_offload = self.fsdp_cpu_offload


def policy_of(mem) -> Policy:
    """The policy a manual ``MemoryConfig`` describes (per-group overrides are not modelled)."""
    return Policy(mem.recompute, mem.recompute_loops, mem.offload_fraction if mem.offload else 0.0,
                  mem.tiled_mlp, mem.tiled_loss, mem.optimizer_offload, mem.fsdp_cpu_offload,
                  mem.selective_save)


# --------------------------------------------------------------------------------------------
# Estimate
# --------------------------------------------------------------------------------------------


@dataclass
class Estimate:
    policy: Policy
    gpu: dict = field(default_factory=dict)  # component -> bytes
    host: dict = field(default_factory=dict)

    @property
    def gpu_total(self) -> int:
        return int(sum(self.gpu.values()))

    @property
    def host_total(self) -> int:
        return int(sum(self.host.values()))


def act_bytes(cfg: Config) -> int:
    dt = cfg.schedule.dtype
    if dt == "auto":
        dt = "bf16" if torch.cuda.is_available() else "fp32"
    return 2 if dt == "bf16" else 4


def _widths(m, lay: Layout) -> dict:
    t, s = lay.tp, lay.sp
    kv_eff = m.n_kv_heads / t
    if s > 1:
        kv_eff = max(kv_eff, s)
    return {"d": m.dim, "qd": m.dim / t, "kvd": kv_eff * m.head_dim, "f": m.ffn_dim / t,
            "h": m.n_heads / t, "dt": m.dim / t}


def layer_activation_bytes(m, lay: Layout, a: int, mode: str = "none", selective_save: str = "attention",
                           tiled_mlp: bool = False) -> float:
    """Bytes saved per token by one block under ``mode`` (the formulae of the module docstring)."""
    w = _widths(m, lay)
    d, qd, kvd, f, h, dt = w["d"], w["qd"], w["kvd"], w["f"], w["h"], w["dt"]
    if mode == "full":
        return a * dt
    if mode == "selective":
        keep = a * dt + a * qd + 4 * h
        mm = a * (qd + 2 * kvd + 2 * d + 2 * f)
        if selective_save == "attention+mm":
            keep += mm
        elif selective_save == "attention+half_mm":
            keep += mm / 2
        return keep
    mlp = 0 if tiled_mlp else 4 * a * f
    return a * (2 * dt + 2 * d + 2 * qd + 2 * kvd) + mlp + 4 * (2 + h) / lay.tp


def _blocks_per_rank(m, lay: Layout) -> dict:
    """Blocks executed with a graph on the busiest pipeline stage: {'plain': n, 'core_calls': k}."""
    if m.arch == "llama":
        return {"plain": math.ceil(m.n_layers / lay.pp), "core_iters": 0}
    loops = m.loops if m.loop_sampling == "fixed" else m.loops_max
    iters = min(loops, m.backprop_loops or loops)
    # the pipeline splits unrolled layers; the core's iterations dominate the busiest stage
    return {"plain": math.ceil((m.n_prelude + m.n_coda) / lay.pp), "core_iters": math.ceil(iters / lay.pp)}


def estimate(cfg: Config, lay: Layout, pol: Policy) -> Estimate:
    """Per-rank memory for ``cfg`` under ``pol``; see the module docstring for each term."""
    m = cfg.model
    a = act_bytes(cfg)
    T = cfg.data.batch_size * cfg.data.seq_len / lay.sp
    w = _widths(m, lay)
    d, qd, kvd, f, dt = w["d"], w["qd"], w["kvd"], w["f"], w["dt"]
    pc = count_params(m)
    # parameters on the busiest rank
    if m.arch == "llama":
        n_blocks_stage = math.ceil(m.n_layers / lay.pp)
    else:
        n_blocks_stage = math.ceil((m.n_prelude + m.n_core + m.n_coda) / lay.pp) if lay.pp > 1 else pc["n_blocks"]
    ends = pc["embedding"] + pc["head"] if lay.pp == 1 else max(pc["embedding"], pc["head"])
    p_local = (n_blocks_stage * pc["block"] + ends + pc["extra"]) / lay.tp / lay.fsdp
    out = Estimate(pol)
    g, hst = out.gpu, out.host
    if pol.fsdp_cpu_offload:
        hst["parameters"], hst["gradients"], hst["optimizer"] = 4 * p_local, 4 * p_local, 8 * p_local
    else:
        g["parameters"], g["gradients"] = 4 * p_local, 4 * p_local
        if pol.optimizer_offload:
            hst["optimizer"] = 16 * p_local  # fp32 master + m + v + gradient staging
        else:
            g["optimizer"] = 8 * p_local
    # saved activations
    nb = _blocks_per_rank(m, lay)
    mode = pol.recompute
    per_block = layer_activation_bytes(m, lay, a, mode, pol.selective_save, bool(pol.tiled_mlp))
    if mode == "none" and pol.tiled_mlp:
        per_block = layer_activation_bytes(m, lay, a, "none", tiled_mlp=True)
    core_blocks = nb["core_iters"] * m.n_core if m.arch == "looped" else 0
    ckpt_inputs = 0.0  # bytes of checkpoint inputs (what offload moves)
    other_saved = 0.0
    if mode == "none":
        other_saved += per_block * nb["plain"] * T
    else:
        ckpt_inputs += a * dt * nb["plain"] * T
        other_saved += (per_block - a * dt) * nb["plain"] * T
    if core_blocks:
        if pol.recompute_loops:
            ckpt_inputs += a * dt * nb["core_iters"] * T
        elif mode == "none":
            other_saved += per_block * core_blocks * T
        else:
            ckpt_inputs += a * dt * core_blocks * T
            other_saved += (per_block - a * dt) * core_blocks * T
    phi = pol.offload_fraction
    if phi and mode == "none" and not pol.recompute_loops:  # offload everything saved
        ckpt_inputs, other_saved = ckpt_inputs + other_saved, 0.0
    g["activations"] = other_saved + (1 - phi) * ckpt_inputs
    if phi:
        hst["offloaded activations"] = phi * ckpt_inputs
        g["offload buffers"] = (cfg.memory.offload_prefetch + 2) * a * dt * T * phi  # in flight + prefetched
    # working set of the largest layer backward
    full_layer = layer_activation_bytes(m, lay, a, "none", tiled_mlp=bool(pol.tiled_mlp)) * T
    if pol.tiled_mlp:
        full_layer += 4 * a * f * T / pol.tiled_mlp
    recomputed = full_layer if mode != "none" else 0.0
    if pol.recompute_loops and core_blocks:
        recomputed = full_layer * m.n_core if mode == "none" else full_layer + a * dt * T * m.n_core
    grads = a * T * (2 * d + max(2 * f / (pol.tiled_mlp or 1), qd + 2 * kvd))
    g["layer working set"] = recomputed + grads
    # loss
    v_local = m.vocab_size / lay.tp
    loss_tokens = min(T, pol.tiled_loss) if pol.tiled_loss else T
    g["logits/loss"] = loss_tokens * v_local * (12 + a)
    # communication
    if lay.sp > 1:
        g["ulysses all-to-all"] = a * T * (2 * qd + 2 * kvd)
    if lay.tp > 1:
        g["tp all-gather"] = 2 * a * T * d
    if lay.fsdp > 1:
        blk = pc["block"] / lay.tp
        g["fsdp all-gather/reduce-scatter"] = 2 * 2 * blk + 4 * blk
    elif a == 2:
        g["autocast weight cache"] = 2 * p_local
    out.gpu = {k: int(v) for k, v in g.items()}
    out.host = {k: int(v) for k, v in hst.items()}
    return out


# --------------------------------------------------------------------------------------------
# The ladder and the choice
# --------------------------------------------------------------------------------------------


def tiling_sizes(cfg: Config, lay: Layout) -> tuple[int, int]:
    """(MLP chunks, loss tokens per chunk): chunks of about ``dim`` tokens for the MLP (Arctic's
    choice: the intermediate then matches a [dim, ffn] weight), about 1 GiB of logits per loss chunk."""
    m = cfg.model
    T = max(1, cfg.data.batch_size * cfg.data.seq_len // lay.sp)
    mlp = max(2, math.ceil(T / m.dim))
    per_tok = m.vocab_size / lay.tp * (12 + act_bytes(cfg))
    loss = max(256, int(GiB // per_tok) // 256 * 256)
    return mlp, min(loss, T) if T >= 256 else max(1, T // 2)


def candidate_policies(cfg: Config, lay: Layout) -> list[Policy]:
    """Cheapest first: least recompute, then least offload, then tiling, then optimizer offload.

    The tiled loss joins from the second rung on: it recomputes only the output projection (one
    [T, dim] x [dim, vocab] product), less than any block recompute, and removes the largest
    tensor of the step, the [T, vocab] logits.
    """
    looped = cfg.model.arch == "looped"
    mlp, loss = tiling_sizes(cfg, lay)
    ladder = [Policy("none"), Policy("none", tiled_loss=loss), Policy("selective", tiled_loss=loss),
              Policy("full", tiled_loss=loss)]
    base = Policy("full", recompute_loops=looped, tiled_loss=loss)
    if looped:
        ladder.append(base)
    for phi in (0.25, 0.5, 0.75, 1.0):
        ladder.append(dataclasses.replace(base, offload_fraction=phi))
    tiled = dataclasses.replace(base, offload_fraction=1.0, tiled_mlp=mlp)
    ladder += [tiled, dataclasses.replace(tiled, optimizer_offload=True)]
    return ladder


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
    layout: Layout
    budget: int
    budget_desc: str
    host_budget: int
    rows: list  # Estimate per candidate
    chosen: Estimate | None


def plan(cfg: Config, world=None) -> Plan:
    lay = layout_from(cfg, world)
    budget, desc = device_budget_bytes(cfg)
    host = int(cfg.memory.host_budget_gb * GiB)
    rows = [estimate(cfg, lay, p) for p in candidate_policies(cfg, lay)]
    chosen = next((e for e in rows if e.gpu_total <= usable(budget) and e.host_total <= host), None)
    return Plan(lay, budget, desc, host, rows, chosen)


def resolve_policy(cfg: Config, world=None) -> Config:
    """A copy of ``cfg`` with the memory fields set to the cheapest policy that fits.

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
# Printing and measuring
# --------------------------------------------------------------------------------------------


def _gib(x: float) -> str:
    return f"{x / GiB:8.2f}"


def format_plan(cfg: Config, p: Plan) -> str:
    m, lay = cfg.model, p.layout
    T = cfg.data.batch_size * cfg.data.seq_len // lay.sp
    head = (f"model {m.arch} dim={m.dim} layers={m.n_unrolled_layers} ffn={m.ffn_dim} vocab={m.vocab_size} "
            f"params={count_params(m)['total'] / 1e9:.3f}B | seq={cfg.data.seq_len} batch={cfg.data.batch_size} "
            f"-> {T} tokens/rank | dp_replicate={lay.dp_replicate} dp_shard={lay.dp_shard} tp={lay.tp} "
            f"sp={lay.sp} pp={lay.pp} | activations {act_bytes(cfg)} B/elem\n"
            f"GPU budget {p.budget_desc}: {usable(p.budget) / GiB:.1f} GiB usable "
            f"(less {RESERVE_FRACTION:.0%} + {RESERVE_BYTES / GiB:g} GiB reserve); host budget "
            f"{p.host_budget / GiB:g} GiB per rank")
    keys = []
    for e in p.rows:
        for k in e.gpu:
            if k not in keys:
                keys.append(k)
    short = {"parameters": "params", "gradients": "grads", "optimizer": "optim", "activations": "acts",
             "offload buffers": "offbuf", "layer working set": "layerws", "logits/loss": "loss",
             "ulysses all-to-all": "a2a", "tp all-gather": "tp-ag", "fsdp all-gather/reduce-scatter": "fsdp",
             "autocast weight cache": "ac-cache"}
    cols = ["policy".ljust(40)] + [short.get(k, k)[:8].rjust(8) for k in keys] + \
           ["GPU GiB".rjust(8), "host GiB".rjust(8), " fits"]
    lines = [head, "", " ".join(cols)]
    for e in p.rows:
        fits = e.gpu_total <= usable(p.budget) and e.host_total <= p.host_budget
        mark = " <- chosen" if e is p.chosen else ("  yes" if fits else "  no")
        vals = [_gib(e.gpu.get(k, 0)) for k in keys]
        lines.append(" ".join([e.policy.name.ljust(40)] + vals + [_gib(e.gpu_total), _gib(e.host_total), mark]))
    if p.chosen is None:
        lines.append("\nnothing fits; see the error for what to change.")
    return "\n".join(lines)


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
