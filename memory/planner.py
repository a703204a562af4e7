"""The memory planner: per-rank memory and step time for a config, and the fastest policy that fits.

Owns: the layout it plans for (``layout_from``:
``ParallelDims.from_config``, as the trainer builds it), the per-rank estimate of every memory
term (``estimate``, one function per term below), the policies weighed (``candidate_policies``),
the choice (``plan``: the fastest that fits by ``memory.step_time``'s model, ties to the least
machinery), ``resolve_policy`` for ``memory.policy=auto``, and ``measure_peak`` to put
measurements next to the estimates. The table ``longtrain plan`` prints and the time model's
error against measured steps are ``memory.plan_table``'s.

Notation: d = model.dim, h = n_heads, kv = n_kv_heads, hd = d/h, f = ffn_dim, V = vocab_size,
t = tp, s = sp, a = bytes of an activation element (2 for bf16, 4 for fp32), r = bytes of the
residual stream. Per rank and micro-batch a layer sees T = batch·seq/s tokens (Ulysses splits the
sequence; inside attention a rank holds all S tokens of h/s heads, which is the same byte count).
Widths per token on one rank: q and the attention output qd = d/t; keys and values
kvd = kv_eff·hd with kv_eff = kv/t, raised to lcm(kv/t, s) when Ulysses has to replicate kv
heads; MLP f/t. Tensor parallelism is assumed sequence-parallel (norms and residuals sharded
over t, projection inputs gathered).

The residual stream (``residual_bytes``): without FSDP the parameters are fp32, the embedding
lookup is not an autocast op and ``x + branch`` promotes to fp32, so r = 4 even under bf16
autocast; under FSDP2 with param_dtype bf16 (one process in bf16 included), r = 2. When r != a every linear casts its fp32
input itself (autocast caches casts of leaf weights only): wq, wk, wv save three bf16 copies of
the attention-norm output, w1 and w3 two of the ffn-norm output.

Saved for backward per token and layer with no recompute (``block_saved_terms``; bytes):

    attention_norm input (the layer input) ........ r·d/t    + 4/t (fp32 rstd)
    attention_norm output = input of wq, wk, wv ... a·d, three copies when r != a
    rotary cos/sin cast to bf16 per call .......... 4·a·hd (q and k each keep a cos and a sin; 0 in fp32)
    q, k, v (saved by attention) .................. a·(qd + 2·kvd)
    attention output = input of wo ................ a·qd     + 4·h/t (fp32 logsumexp)
      with Ulysses the inverse all-to-all makes wo's input a second copy: + a·qd
    ffn_norm input ................................ r·d/t    + 4/t
    ffn_norm output = input of w1, w3 ............. a·d, two copies when r != a
    gate = w1 out (silu input), silu(gate), up = w3 out, silu(gate)·up = w2 input  4·a·f/t
    Peri-LN (``model.norm_placement=peri``): each output norm keeps its input (wo's and w2's
      output) ..................................... 2·(a·d/t + 4/t)
    QK-norm (``model.qk_norm``): q_norm and k_norm keep q and k before rotary, and an fp32
      rstd per head ............................... a·(qd + kvd₀) + 4·(h + kvh₀), kvd₀/kvh₀ the
                                                    rank's key heads before Ulysses repeats them
      (Llama-3.2-1B, a = 2: +13,992 B per token and layer with both; measured +0.83 GiB per block
      at 65,536 tokens, 13.6 KB per token: bench/block_cost.py, docs/performance.md)

    (Llama-3-8B, a = r = 2, t = s = 1: 169,096 B = 165 KiB per token per layer; Llama-3.2-1B on
    one GPU, a = 2, r = 4: 113,288 B, of which 20 KiB are the fp32 stream and the extra casts.)

Per policy (per token and layer):
    none ........ all of the above
    selective ... r·d/t (checkpoint input) + a·qd + 4h/t (attention output and logsumexp kept,
                  ``memory.selective``);
                  ``attention+mm`` adds every matmul output a·(qd + 2kvd + 2d + 2f/t),
                  ``attention+half_mm`` half of that
    full ........ r·d/t (the checkpoint input only: 8 KiB/token for Llama-3-8B under FSDP bf16)
    recompute_loops (looped core) ... r·d/t per *iteration* instead of per core block
    offload φ ... what goes through the offloader: (1-φ) stays on the GPU, φ goes to the host --
                  the checkpoint inputs under ``full``, everything kept under ``selective`` (its
                  attention outputs too) and ``none``
    tiled MLP ... the chunk checkpoints keep the ffn-norm output (r·d) instead of its casts and the
                  4·a·f/t MLP intermediates; one chunk's worth is recomputed at a time
The head's norm also keeps the last block's output, r·d/t per token (tiled or not).
Looped variants: a gated delta rule core layer keeps its own terms (``gdn_block_saved_terms``:
six casts of the norm output, q and k before and after their L2 norm, v, the gates, the kernel's
fp32 [T, h, 64] chunk matrix, the output norm and gate; no rotary) and ``selective`` recomputes
it whole; a core block counts the average over the core's layers. Hyper-connected streams keep
r·(2n+1)·d/t per token and iteration outside the blocks (read input, write input). A loop
schedule is planned at its largest count. These terms come from the code, not yet from a GPU.

The peak is not the sum of everything: gradients are set to None after each step, so they grow
during backward while the activations shrink; the large transients of the loss and of one
block's backward do not coexist. ``estimate`` evaluates four moments and takes the largest:

    forward (loss) ....... saved activations, autocast's cache of bf16 copies of every fp32
                           weight, and the loss forward: bf16 logits + fp32 copy + fp32
                           log-softmax, (a + 8)·V/t bytes per logit row (8 in fp32)
    backward (loss) ...... saved activations, the weight copies the graph saved (all blocks' with
                           no recompute, the output projection's unless the loss is tiled), and
                           the cross-entropy backward: saved log-probs + nll_loss's dense gradient
                           + log_softmax's input gradient, 12·V/t bytes per row, for T rows or
                           one chunk of c rows with the tiled loss (which adds the recast weight,
                           its bf16 and fp32 gradients, and the chunks' [T, d] gradients kept for
                           one concatenation)
    backward (first block) the output projection's gradient, saved activations, and one block's
                           backward: what recompute rebuilds (everything but what it kept), plus
                           the larger of the MLP backward's two extra [T, f] gradients and the
                           attention backward's dq/dk/dv (+ fp32 dq accumulator, + the Ulysses
                           all-to-all buffers of those gradients), plus the incoming [T, d]
                           gradient and the block's weight gradients; offload prefetch buffers
    optimizer step ....... parameters, all gradients, optimizer state
With gradient accumulation (schedule.grad_accum > 1) all gradients exist in every phase.
Communication: FSDP2 keeps the root's unsharded weights (embedding, head) for the whole step
(reshard_after_forward=False), and a looped model's core (one unit for all its iterations) from
its forward to its backward, and in backward holds the current and prefetched unsharded block,
its unsharded gradients and their fp32 reduce-scatter input; without FSDP autocast's bf16 weight
copies are the ``weight copies`` term; TP all-gathers 2·a·T·d.

Static state per parameter (parameters are fp32, FSDP2 shards them over dp_shard·sp, tensor
parallelism over tp, the pipeline keeps ceil(L/pp) blocks plus the larger of embedding/head):
parameters 4, gradients 4, Adam m and v 8 bytes. Optimizer offload moves m, v and an fp32
master (4) and a gradient staging buffer (4) to the host; FSDP CPU offload moves parameters,
gradients and optimizer state there.

The usable GPU memory is the budget less a reserve for the CUDA context, NCCL, and allocator
fragmentation (8% + 1 GiB). These are estimates of the live tensors (what
``torch.cuda.max_memory_allocated`` counts), checked on H200 against ``measure_peak`` for
Llama-3.2-1B (64K on 1 GPU, full, untiled loss: 119.9 vs 120.0 GiB measured -- that run's model
had an untied head, 117.0 tied; none + tiled loss: 131.4 vs 129.8; 1M on 2 GPUs sp=2, full +
tiled loss: 104.0 vs 100.7) and
Llama-3-8B (128K, sp=2, selective + tiled loss: 96.7 vs 96.0) -- the same runs that were used to
find these formulae. Memory the allocator reserves but has not handed out (fragmentation, most
of all with untiled [T, V] logits of tens of GiB) is not modelled beyond the reserve.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from dataclasses import dataclass, field

import torch

from longtrain.config import Config, ConfigError
from longtrain.memory.step_time import H200, Rates, StepTime, step_time
from longtrain.models.attention import selective_recompute_supported
from longtrain.models.costs import GDN_CHUNK, core_mixers, count_params
from longtrain.models.looped import planned_loops
from longtrain.parallel.mesh import ParallelDims
from longtrain.parallel.precision import fsdp_wraps

GiB = 2**30
RESERVE_FRACTION = 0.08
RESERVE_BYTES = 1 * GiB


# --------------------------------------------------------------------------------------------
# Layout and policy
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


def fsdp_size(lay: ParallelDims) -> int:
    """Ranks a parameter is sharded over: dp_shard x sp (``parallel.fsdp``)."""
    return lay.dp_shard * lay.sp


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
    """The policy a manual ``MemoryConfig`` describes (per-group overrides are not modelled: a
    warning says so when ``recompute_layers`` is set)."""
    if mem.recompute_layers:
        warnings.warn(f"memory.recompute_layers={list(mem.recompute_layers)} is not modelled by the memory "
                      f"planner: its estimate treats every block as memory.recompute={mem.recompute}. For an "
                      f"upper bound, plan with memory.recompute set to the mode among them that keeps the "
                      f"most (none, then selective, then full).", stacklevel=2)
    return Policy(mem.recompute, mem.recompute_loops, mem.offload_fraction if mem.offload else 0.0,
                  mem.tiled_mlp, mem.tiled_loss, mem.optimizer_offload, mem.fsdp_cpu_offload,
                  mem.selective_save)


# --------------------------------------------------------------------------------------------
# Estimate
# --------------------------------------------------------------------------------------------


@dataclass
class Estimate:
    policy: Policy
    gpu: dict = field(default_factory=dict)  # component -> bytes, at the peak phase
    host: dict = field(default_factory=dict)
    phase: str = ""  # the moment of the step the peak is at
    phases: dict = field(default_factory=dict)  # phase -> GPU bytes
    phase_terms: dict = field(default_factory=dict)  # phase -> {component -> bytes}
    time: StepTime | None = None  # the step-time model's estimate (memory.step_time)

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


def _param_bytes(cfg: Config, a: int) -> int:
    p = cfg.parallel.param_dtype
    if p == "auto":  # follows schedule.dtype (parallel.fsdp.param_dtype_name)
        return a
    return 2 if p == "bf16" else 4


def uses_fsdp(lay: ParallelDims, cfg: Config, a: int | None = None, fsdp_cpu_offload: bool = False) -> bool:
    """Whether FSDP2 wraps the model, by the trainer's own rule (``parallel.precision.fsdp_wraps``),
    for parameters in the dtype ``_param_bytes`` gives at activation bytes ``a``."""
    param = "bf16" if _param_bytes(cfg, act_bytes(cfg) if a is None else a) == 2 else "fp32"
    return fsdp_wraps(lay.dp_replicate, lay.dp_shard, lay.sp, param, fsdp_cpu_offload)


def weight_bytes(cfg: Config, lay: ParallelDims, a: int) -> int:
    """Bytes of the weights the matmuls see: FSDP2's unsharded ``param_dtype`` copy, else fp32."""
    if not uses_fsdp(lay, cfg, a):
        return 4
    return _param_bytes(cfg, a)


def residual_bytes(cfg: Config, lay: ParallelDims, a: int) -> int:
    """Bytes per element of the residual stream (every block's input and output).

    With ``parallel.param_dtype=fp32`` the parameters are fp32: the embedding lookup is not an
    autocast op, so its output is fp32, and ``x + bf16_branch`` promotes back to fp32 after every
    attention and MLP, so the block inputs and the norms' inputs/outputs are fp32 even under bf16
    autocast. Under FSDP2 with ``param_dtype=bf16`` (with no data-parallel peers too: one process,
    or tensor / pipeline parallelism alone, on a one-rank mesh) the embedding weight is bf16 and
    the stream is bf16.
    """
    return 4 if a == 4 else weight_bytes(cfg, lay, a)


def _widths(m, lay: ParallelDims) -> dict:
    t, s = lay.tp, lay.sp
    kv_t = max(1, m.n_kv_heads // t)
    kv_eff = kv_t * (s // math.gcd(kv_t, s)) if s > 1 else m.n_kv_heads / t  # Ulysses repeats kv heads to lcm(kv, sp)
    return {"d": m.dim, "qd": m.dim / t, "kvd": kv_eff * m.head_dim, "f": m.ffn_dim / t,
            "h": m.n_heads / t, "dt": m.dim / t, "hd": m.head_dim}


def block_saved_terms(m, lay: ParallelDims, a: int, r: int | None = None, tiled_mlp: bool = False) -> dict:
    """Bytes per token that autograd keeps for one block with no recompute, by tensor.

    ``r``: bytes of the residual stream (``residual_bytes``; defaults to ``a``). When r != a (fp32
    stream, bf16 autocast) every linear casts its fp32 input itself -- autocast caches casts of
    leaf weights only -- so wq, wk, wv each save their own bf16 copy of the attention-norm output
    and w1, w3 theirs of the ffn-norm output; the fp32 norm outputs are transient.
    """
    r = a if r is None else r
    w = _widths(m, lay)
    d, qd, kvd, f, h, dt, hd = w["d"], w["qd"], w["kvd"], w["f"], w["h"], w["dt"], w["hd"]
    cast = r != a
    return {
        "input": r * dt + 4 / lay.tp,  # attention_norm input (= the block input) + fp32 rstd
        "attention_norm out": (3 if cast else 1) * a * d,  # input of wq, wk, wv
        # apply_rotary casts the fp32 cos/sin tables to x.dtype per call: q and k each save a cos
        # and a sin copy [T, hd] (no copy, hence the shared tables only, when a == 4)
        "rotary": 0 if a == 4 else 4 * a * hd,
        "q k v": a * (qd + 2 * kvd),  # saved by the attention kernel (after the all-to-all with sp)
        "attention out": a * qd + 4 * h,  # output (= wo input without sp) + fp32 logsumexp
        # with Ulysses the inverse all-to-all makes a new tensor: wo saves it beside the kernel's out
        "ulysses out": a * qd if lay.sp > 1 else 0,
        "ffn_norm input": r * dt + 4 / lay.tp,
        # tiled MLP: the chunk checkpoints keep their input (the norm output, r bytes) instead
        "ffn_norm out": r * d if tiled_mlp else (2 if cast else 1) * a * d,
        "mlp": 0 if tiled_mlp else 4 * a * f,  # w1 out (silu input), silu, w3 out, their product (w2 input)
        **stability_saved_terms(m, lay, a),
    }


def stability_saved_terms(m, lay: ParallelDims, a: int) -> dict:
    """What the stability options add to a block's saved tensors (module docstring): Peri-LN's two
    output norms keep their inputs, QK-norm's per-head norms keep q and k before rotary."""
    w = _widths(m, lay)
    kvh = max(1, m.n_kv_heads // lay.tp)  # the rank's key heads, before Ulysses repeats them
    return {"peri norms": 2 * (a * w["dt"] + 4 / lay.tp) if m.norm_placement == "peri" else 0,
            "qk norms": a * (w["qd"] + kvh * w["hd"]) + 4 * (w["h"] + kvh) if m.qk_norm else 0}


def gdn_block_saved_terms(m, lay: ParallelDims, a: int, r: int | None = None, tiled_mlp: bool = False) -> dict:
    """``block_saved_terms`` for a gated delta rule core layer (``models.linear_attention``): six
    projections read the norm output; q and k are saved before and after their L2 norm, v, the
    fp32 log decay (softplus in and out) and beta; the kernel keeps its per-chunk triangular
    matrix (fla: fp32 [T, heads, 64]); the output's per-head norm, the gate (silu in and out) and
    their product (wo's input). No rotary. Estimated from the code, not yet measured."""
    r = a if r is None else r
    terms = block_saved_terms(m, lay, a, r, tiled_mlp)
    w = _widths(m, lay)
    qd, h, d = w["qd"], w["h"], w["d"]
    terms.update({"attention_norm out": (6 if r != a else 1) * a * d, "rotary": 0,
                  "qk norms": 0,  # QK-norm adds nothing to a gdn layer: its core L2-normalises q and k
                  "q k v": a * 5 * qd + 8 * h + 2 * a * h,
                  "attention out": 4 * a * qd + 4 * h + 4 * GDN_CHUNK * h})
    return terms


def layer_activation_bytes(m, lay: ParallelDims, a: int, mode: str = "none", selective_save: str = "attention",
                           tiled_mlp: bool = False, r: int | None = None, mixer: str = "full") -> float:
    """Bytes saved per token by one block under ``mode`` (the formulae of the module docstring).

    ``r``: bytes of the residual stream (see ``residual_bytes``); defaults to ``a``. ``mixer``:
    ``gdn`` for a gated delta rule layer, which ``selective`` recomputes whole (its kernel is not
    one of the attention ops ``memory.selective`` keeps; its recurrence is linear in length).
    """
    r = a if r is None else r
    w = _widths(m, lay)
    d, qd, kvd, f, h, dt = w["d"], w["qd"], w["kvd"], w["f"], w["h"], w["dt"]
    if mode == "full":
        return r * dt
    if mode == "selective":
        keep = r * dt + (a * qd + 4 * h if mixer == "full" else 0)
        mm = a * (qd + 2 * kvd + 2 * d + 2 * f)
        if selective_save == "attention+mm":
            keep += mm
        elif selective_save == "attention+half_mm":
            keep += mm / 2
        return keep
    saved = gdn_block_saved_terms if mixer == "gdn" else block_saved_terms
    return sum(saved(m, lay, a, r, tiled_mlp).values())


def _blocks_per_rank(m, lay: ParallelDims) -> dict:
    """Blocks executed with a graph on the busiest pipeline stage: {'plain': n, 'core_calls': k}."""
    if m.arch == "llama":
        return {"plain": math.ceil(m.n_layers / lay.pp), "core_iters": 0}
    loops = planned_loops(m)  # the largest of a loop schedule; loops_max when sampled
    iters = min(loops, m.backprop_loops or loops)
    # the pipeline splits unrolled layers; the core's iterations dominate the busiest stage
    return {"plain": math.ceil((m.n_prelude + m.n_coda) / lay.pp), "core_iters": math.ceil(iters / lay.pp)}


@dataclass
class _Shape:
    """What every term of one estimate reads: bytes per element, widths, tokens, counts."""

    a: int  # activation bytes
    r: int  # residual-stream bytes
    wb: int  # bytes of the weights the matmuls see
    fsdp_on: bool
    cast_w: bool  # autocast makes bf16 copies of fp32 weights
    T: float  # tokens per rank and micro-batch
    w: dict  # widths per token on one rank (``_widths``)
    blk: float  # parameters of one block on this rank
    head_w: float  # the output projection's weight on this rank
    ends: float  # embedding and head parameters on the busiest stage
    n_blocks_stage: int
    p_local: float  # parameters on this rank (sharded)
    nb: dict  # blocks run with a graph (``_blocks_per_rank``)


def _shape(cfg: Config, lay: ParallelDims, pol: Policy) -> _Shape:
    m = cfg.model
    a = act_bytes(cfg)
    wb = weight_bytes(cfg, lay, a)
    pc = count_params(m)
    if m.arch == "llama":
        n_blocks_stage = math.ceil(m.n_layers / lay.pp)
    else:
        n_blocks_stage = math.ceil((m.n_prelude + m.n_core + m.n_coda) / lay.pp) if lay.pp > 1 else pc["n_blocks"]
    ends = pc["embedding"] + pc["head"] if lay.pp == 1 else max(pc["embedding"], pc["head"])
    return _Shape(a=a, r=residual_bytes(cfg, lay, a), wb=wb,
                  fsdp_on=uses_fsdp(lay, cfg, a, pol.fsdp_cpu_offload),
                  cast_w=a == 2 and wb == 4, T=cfg.data.batch_size * cfg.data.seq_len / lay.sp,
                  w=_widths(m, lay), blk=pc["block"] / lay.tp, head_w=m.vocab_size * m.dim / lay.tp,
                  ends=ends, n_blocks_stage=n_blocks_stage,
                  p_local=(n_blocks_stage * pc["block"] + ends + pc["extra"]) / lay.tp / fsdp_size(lay),
                  nb=_blocks_per_rank(m, lay))


def static_terms(pol: Policy, sh: _Shape) -> tuple[dict, dict, float]:
    """(GPU, host, all gradients) bytes of parameters, gradients and optimizer state: 4 + 4 + 8 a
    parameter, sharded; optimizer offload moves m, v, an fp32 master and a gradient staging buffer
    to the host, FSDP CPU offload parameters, gradients and optimizer state."""
    gpu, host = {}, {}
    if pol.fsdp_cpu_offload:
        host["parameters"], host["gradients"], host["optimizer"] = 4 * sh.p_local, 4 * sh.p_local, 8 * sh.p_local
        return gpu, host, 0.0
    gpu["parameters"] = 4 * sh.p_local
    if pol.optimizer_offload:
        host["optimizer"] = 16 * sh.p_local
    else:
        gpu["optimizer"] = 8 * sh.p_local
    return gpu, host, 4 * sh.p_local


def saved_activation_terms(cfg: Config, lay: ParallelDims, pol: Policy, sh: _Shape) -> tuple[dict, dict, float]:
    """(GPU, host, bytes each block keeps per token) for what the blocks save for backward.

    Offload moves what goes through the offloader: the checkpoint inputs, and with ``none`` or
    ``selective`` everything else a block keeps too (saved tensors by the hooks; the attention
    outputs ``selective`` keeps through ``memory.selective``'s store). ``recompute_loops`` keeps
    one input per core iteration instead of its blocks' internals.
    """
    m, T, dt = cfg.model, sh.T, sh.w["dt"]
    mode = pol.recompute
    def kept(mixer):
        return layer_activation_bytes(m, lay, sh.a, mode, pol.selective_save, bool(pol.tiled_mlp), sh.r, mixer)

    per_block = kept("full")
    core_blocks = sh.nb["core_iters"] * m.n_core if m.arch == "looped" else 0
    # a core block keeps the average over the core's layers (gated delta rule layers keep their own)
    per_core = sum(kept(x) for x in core_mixers(m)) / m.n_core if core_blocks else per_block
    inputs = sh.r * dt  # a checkpoint's input per token
    ckpt, other = 0.0, 0.0
    for n, per in ([(sh.nb["plain"], per_block)] + ([] if pol.recompute_loops else [(core_blocks, per_core)])):
        if mode == "none":
            other += per * n * T
        else:
            ckpt += inputs * n * T
            other += (per - inputs) * n * T
    if core_blocks and pol.recompute_loops:
        ckpt += inputs * sh.nb["core_iters"] * T
    phi = pol.offload_fraction
    if phi and mode in ("none", "selective"):  # everything kept goes through the offloader
        ckpt, other = ckpt + other, 0.0
    if m.arch == "looped" and m.hyper_streams > 1:  # the streams each iteration's read and write keep
        other += sh.r * (2 * m.hyper_streams + 1) * dt * sh.nb["core_iters"] * T
    gpu = {"activations": other + (1 - phi) * ckpt,
           # the head's norm keeps the last block's output (a tiled loss keeps it too: its chunks are views)
           "head input": (sh.r * dt + 4 / lay.tp) * T}
    host = {"offloaded activations": phi * ckpt} if phi else {}
    moved_per_block = (per_block if mode in ("none", "selective") else inputs)
    return gpu, host, moved_per_block


def weight_copy_terms(pol: Policy, sh: _Shape) -> tuple[float, float]:
    """(saved, cached) bytes of autocast's bf16 copies of fp32 weights: saved by the matmuls that
    use them (all blocks with no recompute, only the block being recomputed otherwise; the output
    projection's unless the loss is tiled, whose chunks recast it when recomputed); at the end of
    forward autocast's cache still holds a copy of every weight. None under FSDP2 in bf16."""
    if not sh.cast_w:
        return 0.0, 0.0
    saved = (2 * sh.n_blocks_stage * sh.blk if pol.recompute == "none" else 0) + (0 if pol.tiled_loss else 2 * sh.head_w)
    return saved, 2 * (sh.n_blocks_stage * sh.blk + sh.head_w)


def communication_terms(cfg: Config, lay: ParallelDims, pol: Policy, sh: _Shape) -> dict:
    """FSDP2 keeps the root's unsharded weights (embedding, head: reshard_after_forward=False) for
    the whole step, and a looped model's core (one unit for all its iterations) from its forward to
    its backward; in backward it holds the current and prefetched unsharded block, its unsharded
    gradients and their fp32 reduce-scatter input. TP all-gathers 2·a·T·d."""
    m = cfg.model
    comm = {}
    if sh.fsdp_on:
        comm["fsdp unsharded root"] = sh.wb * sh.ends / lay.tp
        if m.arch == "looped" and sh.nb["core_iters"]:
            comm["fsdp unsharded root"] += sh.wb * m.n_core * sh.blk
    if lay.tp > 1:
        comm["tp all-gather"] = 2 * sh.a * sh.T * sh.w["d"]
    if sh.fsdp_on:
        red = 4 * sh.blk if cfg.parallel.reduce_dtype == "fp32" and sh.wb != 4 else 0
        # under CPU offload a block's fp32 shard is copied in before its gather and its reduced
        # fp32 gradient waits on the GPU for its copy out
        red += 8 * sh.blk if pol.fsdp_cpu_offload else 0
        comm["fsdp block gathers"] = 2 * sh.wb * sh.blk + sh.wb * sh.blk + red
    return comm


def loss_terms(cfg: Config, lay: ParallelDims, pol: Policy, sh: _Shape) -> tuple[float, float]:
    """(forward, backward) bytes of the loss over [c, V] logits, c = T or the tiled chunk.

    Forward: bf16 logits, their fp32 copy (.float()) and the fp32 log-softmax, all alive at once;
    backward: the saved log-softmax, nll_loss's dense [c, V] gradient and log_softmax's output
    gradient (the bf16 logits are freed by then) -- 12 bytes per logit. The tiled loss adds, per
    chunk, a recomputed bf16 copy of the weight, its bf16 gradient and the fp32 copy of that added
    into .grad, and keeps the chunks' gradients w.r.t. h until one concatenation.
    """
    a, r, dt, T = sh.a, sh.r, sh.w["dt"], sh.T
    v_local = cfg.model.vocab_size / lay.tp
    c = min(T, pol.tiled_loss) if pol.tiled_loss else T
    ce_fwd = (a + 8 if a == 2 else 8) * v_local * c
    ce_bwd = 12 * v_local * c
    if pol.tiled_loss:
        w_tr = (2 + 2 + 4) * sh.head_w if sh.cast_w else sh.wb * sh.head_w
        return ce_fwd, ce_bwd + w_tr + 2 * r * dt * T
    proj_in = a * dt * T if sh.cast_w or r != a else 0  # the projection's saved input
    return ce_fwd + proj_in, ce_bwd + proj_in


def block_backward_bytes(cfg: Config, lay: ParallelDims, pol: Policy, sh: _Shape) -> float:
    """The backward of one block (the largest is the first: everything still saved): what
    recompute rebuilds, the larger of the MLP backward's two extra [T, f] gradients and the
    attention backward's dq/dk/dv (+ fp32 dq accumulator, + the Ulysses all-to-all buffers of
    those gradients), the incoming [T, d] gradient and the block's weight gradients."""
    m, a, r, T = cfg.model, sh.a, sh.r, sh.T
    d, qd, kvd, f, dt = sh.w["d"], sh.w["qd"], sh.w["kvd"], sh.w["f"], sh.w["dt"]
    mode = pol.recompute
    none_terms = block_saved_terms(m, lay, a, r, bool(pol.tiled_mlp))
    none_bytes = sum(none_terms.values())
    kept = layer_activation_bytes(m, lay, a, mode, pol.selective_save, bool(pol.tiled_mlp), r)
    recomputed = 0.0 if mode == "none" else none_bytes - kept  # per token
    if pol.tiled_mlp:  # one chunk's intermediates, their gradients and (fp32 stream) its input casts
        mlp_tr = (6 * a * f + (2 * a * d if r != a else 0)) / pol.tiled_mlp
    else:  # MLP backward: silu(g) and up saved, d(product) in, d(silu) and d(up) out: +2 [T, f]
        mlp_tr = 2 * a * f
    attn_tr = (a * (qd + 2 * kvd) + 4 * qd + (2 * a * (qd + 2 * kvd) if lay.sp > 1 else 0)
               - none_terms["mlp"] - none_terms["ffn_norm out"])
    work = recomputed + max(mlp_tr, attn_tr) + r * dt  # + the incoming gradient of the residual
    if pol.recompute_loops and sh.nb["core_iters"] and m.arch == "looped":
        layer = (none_bytes * m.n_core if mode == "none" else none_bytes + r * dt * m.n_core) + max(mlp_tr, attn_tr)
        work = max(work, layer)
    return work * T + (2 * sh.blk if sh.cast_w and mode != "none" else 0) + (6 if sh.cast_w else 4) * sh.blk


def estimate(cfg: Config, lay: ParallelDims, pol: Policy, rates: Rates = H200) -> Estimate:
    """Per-rank peak memory and step time for ``cfg`` under ``pol``; see the module docstring for
    each memory term and ``memory.step_time`` for the time.

    The peak is the largest of four moments of a step (``Estimate.phases``); ``gpu`` holds the
    terms of the largest, ``phase`` names it.
    """
    sh = _shape(cfg, lay, pol)
    base, hst, grads_full = static_terms(pol, sh)
    acts, off_host, moved_per_block = saved_activation_terms(cfg, lay, pol, sh)
    hst.update(off_host)
    saved_w, cache_w = weight_copy_terms(pol, sh)
    comm = communication_terms(cfg, lay, pol, sh)
    loss_fwd, loss_bwd = loss_terms(cfg, lay, pol, sh)
    layer_ws = block_backward_bytes(cfg, lay, pol, sh)
    # Gradients are set to None after each step, so during backward only those already produced
    # exist: at its start (where activations peak) the output projection's, no block's. With FSDP
    # that one is the root's unsharded gradient in param_dtype (on the GPU under FSDP CPU offload
    # too, until it is reduced); the blocks' sharded fp32 gradients grow as their activations are
    # freed. With gradient accumulation every micro-batch after the first finds all in place.
    head_grad = (sh.wb if sh.fsdp_on else 4) * sh.head_w
    accum = cfg.schedule.grad_accum > 1
    g_acc = grads_full if accum else 0.0
    # the head's gradient on top: none yet, or (accumulating, no FSDP) already inside grads_full;
    # under FSDP the root's unsharded gradient comes on top of the sharded ones
    g_head = (head_grad if sh.fsdp_on else 0.0) if accum else head_grad
    phases = {
        "forward (loss)": {**base, "gradients": g_acc + (g_head if accum else 0), **acts,
                           "weight copies": cache_w, **{k: v for k, v in comm.items() if k != "tp all-gather"},
                           "logits/loss": loss_fwd},
        "backward (loss)": {**base, "gradients": g_acc + (g_head if (pol.tiled_loss or accum) else 0),
                            **acts, "weight copies": saved_w,
                            **{k: v for k, v in comm.items() if k == "fsdp unsharded root"},
                            "logits/loss": loss_bwd},
        "backward (first block)": {**base, "gradients": g_acc + g_head, "activations": acts["activations"],
                                   "weight copies": saved_w, "layer working set": layer_ws, **comm},
        "optimizer step": {**base, "gradients": grads_full},
    }
    if pol.offload_fraction:
        # what comes back to the GPU for the current block and each prefetched one (a prefetched
        # tensor is rebuilt whole and its GPU part freed, memory.offload), plus one more: offload
        # rows measured 4-12% above this estimate (docs/performance.md)
        phases["backward (first block)"]["offload buffers"] = \
            (cfg.memory.offload_prefetch + 2) * moved_per_block * sh.T * pol.offload_fraction
    out = Estimate(pol)
    out.phase_terms = {k: {n: int(x) for n, x in v.items() if x} for k, v in phases.items()}
    out.phases = {k: sum(v.values()) for k, v in out.phase_terms.items()}
    out.phase = max(out.phases, key=out.phases.get)
    out.gpu = dict(out.phase_terms[out.phase])
    out.host = {k: int(v) for k, v in hst.items()}
    out.time = step_time(cfg, lay, pol, out.host.get("offloaded activations", 0), sh.p_local, sh.a, rates)
    return out


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
