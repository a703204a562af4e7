"""The memory of one training step on one rank under one memory policy, by term and by moment.

Owns: ``Policy`` (the memory settings the planner varies; ``policy_of`` reads one from a manual
``MemoryConfig``), the bytes of an element (``act_bytes``; ``residual_bytes`` and
``weight_bytes``, which follow FSDP2's rule ``uses_fsdp``), one function per memory term below,
and ``estimate``: the four moments of a step, the peak among them, and ``memory.step_time``'s
seconds beside it. What one block saves per token is ``memory.activations``'; which policies
are weighed and which one is chosen, ``memory.planner``'s.

Notation as in ``memory.activations`` (d, h, kv, hd, f, t, s, a, r, T), and V = vocab_size.

The residual stream (``residual_bytes``): without FSDP the parameters are fp32, the embedding
lookup is not an autocast op and ``x + branch`` promotes to fp32, so r = 4 even under bf16
autocast; under FSDP2 with param_dtype bf16 (one process in bf16 included), r = 2.

Saved activations of a stage (``saved_activation_terms``): each block keeps what
``memory.activations.layer_activation_bytes`` gives for the recompute mode, and per token:
    recompute_loops (looped core) ... r·d/t per *iteration* instead of per core block
    offload φ ... what goes through the offloader: (1-φ) stays on the GPU, φ goes to the host --
                  the checkpoint inputs under ``full``, everything kept under ``selective`` (its
                  attention outputs too) and ``none``
The head's norm also keeps the last block's output, r·d/t per token (tiled or not). A looped
model's core block counts the average over the core's layers (a gated delta rule layer keeps its
own terms). Hyper-connected streams keep r·(2n+1)·d/t per token and iteration outside the
blocks (read input, write input). A loop schedule is planned at its largest count. The looped
terms come from the code, not yet from a GPU.

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

These are estimates of the live tensors (what ``torch.cuda.max_memory_allocated`` counts),
checked on H200 against ``memory.planner.measure_peak`` for Llama-3.2-1B (64K on 1 GPU, full,
untiled loss: 119.9 vs 120.0 GiB measured -- that run's model had an untied head, 117.0 tied;
none + tiled loss: 131.4 vs 129.8; 1M on 2 GPUs sp=2, full + tiled loss: 104.0 vs 100.7) and
Llama-3-8B (128K, sp=2, selective + tiled loss: 96.7 vs 96.0) -- the same runs that were used to
find these formulae. Memory the allocator reserves but has not handed out (fragmentation, most
of all with untiled [T, V] logits of tens of GiB) is not modelled beyond the planner's reserve
(``memory.planner.usable``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from longtrain.config import Config
from longtrain.memory.activations import block_saved_terms, layer_activation_bytes, widths
from longtrain.memory.step_time import H200, Rates, StepTime, step_time
from longtrain.models.costs import core_mixers, count_params
from longtrain.models.looped import planned_loops
from longtrain.parallel.mesh import ParallelDims
from longtrain.parallel.precision import fsdp_wraps


# --------------------------------------------------------------------------------------------
# Policy and element bytes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """The memory settings the planner varies, one rung of its ladder; ``apply_to`` writes them
    into a ``MemoryConfig``, ``policy_of`` reads them back."""

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


def act_bytes(cfg: Config) -> int:
    """Bytes of an activation element (a): 2 under bf16 autocast, 4 in fp32; ``schedule.dtype=auto``
    is bf16 where CUDA is available."""
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


# --------------------------------------------------------------------------------------------
# The terms and the peak
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


def fsdp_size(lay: ParallelDims) -> int:
    """Ranks a parameter is sharded over: dp_shard x sp (``parallel.fsdp``)."""
    return lay.dp_shard * lay.sp


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
    w: dict  # widths per token on one rank (``memory.activations.widths``)
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
                  w=widths(m, lay), blk=pc["block"] / lay.tp, head_w=m.vocab_size * m.dim / lay.tp,
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

