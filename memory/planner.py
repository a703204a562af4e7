"""The memory planner: per-rank estimates for a config, and the cheapest policy that fits.

Owns: exact parameter counts (``count_params``), the per-rank estimate of every memory term
(``estimate``), the ladder of policies from cheapest to leanest (``candidate_policies``), the
choice (``plan``), ``resolve_policy`` for ``memory.policy=auto``, the table ``longtrain plan``
prints, and ``measure_peak`` to put measurements next to the estimates.

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

    (Llama-3-8B, a = r = 2, t = s = 1: 169,096 B = 165 KiB per token per layer; Llama-3.2-1B on
    one GPU, a = 2, r = 4: 113,288 B, of which 20 KiB are the fp32 stream and the extra casts.)

Per policy (per token and layer):
    none ........ all of the above
    selective ... r·d/t (checkpoint input) + a·qd + 4h/t (attention output and logsumexp kept);
                  ``attention+mm`` adds every matmul output a·(qd + 2kvd + 2d + 2f/t),
                  ``attention+half_mm`` half of that
    full ........ r·d/t (the checkpoint input only: 8 KiB/token for Llama-3-8B under FSDP bf16)
    recompute_loops (looped core) ... r·d/t per *iteration* instead of per core block
    offload φ ... the checkpoint inputs: (1-φ) stay on the GPU, φ go to the host
    tiled MLP ... the chunk checkpoints keep the ffn-norm output (r·d) instead of its casts and the
                  4·a·f/t MLP intermediates; one chunk's worth is recomputed at a time
The head's norm also keeps the last block's output, r·d/t per token (tiled or not).

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
from longtrain.models.costs import count_params

GiB = 2**30
RESERVE_FRACTION = 0.08
RESERVE_BYTES = 1 * GiB


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


def uses_fsdp(lay: Layout, cfg: Config | None = None, a: int | None = None) -> bool:
    """As ``parallel.fsdp.uses_fsdp``: sharded over dp, or, with no data-parallel peers (one process,
    tensor or pipeline parallelism alone), wrapped on a one-rank mesh for bf16 weights."""
    if lay.dp_replicate * lay.fsdp > 1:
        return True
    if cfg is None:
        return False
    return _param_bytes(cfg, act_bytes(cfg) if a is None else a) == 2


def weight_bytes(cfg: Config, lay: Layout, a: int) -> int:
    """Bytes of the weights the matmuls see: FSDP2's unsharded ``param_dtype`` copy, else fp32."""
    if not uses_fsdp(lay, cfg, a):
        return 4
    return _param_bytes(cfg, a)


def residual_bytes(cfg: Config, lay: Layout, a: int) -> int:
    """Bytes per element of the residual stream (every block's input and output).

    With ``parallel.param_dtype=fp32`` the parameters are fp32: the embedding lookup is not an
    autocast op, so its output is fp32, and ``x + bf16_branch`` promotes back to fp32 after every
    attention and MLP, so the block inputs and the norms' inputs/outputs are fp32 even under bf16
    autocast. Under FSDP2 with ``param_dtype=bf16`` (with no data-parallel peers too: one process,
    or tensor / pipeline parallelism alone, on a one-rank mesh) the embedding weight is bf16 and
    the stream is bf16.
    """
    return 4 if a == 4 else weight_bytes(cfg, lay, a)


def _widths(m, lay: Layout) -> dict:
    t, s = lay.tp, lay.sp
    kv_t = max(1, m.n_kv_heads // t)
    kv_eff = kv_t * (s // math.gcd(kv_t, s)) if s > 1 else m.n_kv_heads / t  # Ulysses repeats kv heads to lcm(kv, sp)
    return {"d": m.dim, "qd": m.dim / t, "kvd": kv_eff * m.head_dim, "f": m.ffn_dim / t,
            "h": m.n_heads / t, "dt": m.dim / t, "hd": m.head_dim}


def block_saved_terms(m, lay: Layout, a: int, r: int | None = None, tiled_mlp: bool = False) -> dict:
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
    }


def layer_activation_bytes(m, lay: Layout, a: int, mode: str = "none", selective_save: str = "attention",
                           tiled_mlp: bool = False, r: int | None = None) -> float:
    """Bytes saved per token by one block under ``mode`` (the formulae of the module docstring).

    ``r``: bytes of the residual stream (see ``residual_bytes``); defaults to ``a``.
    """
    r = a if r is None else r
    w = _widths(m, lay)
    d, qd, kvd, f, h, dt = w["d"], w["qd"], w["kvd"], w["f"], w["h"], w["dt"]
    if mode == "full":
        return r * dt
    if mode == "selective":
        keep = r * dt + a * qd + 4 * h
        mm = a * (qd + 2 * kvd + 2 * d + 2 * f)
        if selective_save == "attention+mm":
            keep += mm
        elif selective_save == "attention+half_mm":
            keep += mm / 2
        return keep
    return sum(block_saved_terms(m, lay, a, r, tiled_mlp).values())


def _blocks_per_rank(m, lay: Layout) -> dict:
    """Blocks executed with a graph on the busiest pipeline stage: {'plain': n, 'core_calls': k}."""
    if m.arch == "llama":
        return {"plain": math.ceil(m.n_layers / lay.pp), "core_iters": 0}
    loops = m.loops if m.loop_sampling == "fixed" else m.loops_max
    iters = min(loops, m.backprop_loops or loops)
    # the pipeline splits unrolled layers; the core's iterations dominate the busiest stage
    return {"plain": math.ceil((m.n_prelude + m.n_coda) / lay.pp), "core_iters": math.ceil(iters / lay.pp)}


def estimate(cfg: Config, lay: Layout, pol: Policy) -> Estimate:
    """Per-rank peak memory for ``cfg`` under ``pol``; see the module docstring for each term.

    The peak is the largest of four moments of a step (``Estimate.phases``); ``gpu`` holds the
    terms of the largest, ``phase`` names it.
    """
    m = cfg.model
    a = act_bytes(cfg)
    r = residual_bytes(cfg, lay, a)
    wb = weight_bytes(cfg, lay, a)
    fsdp_on = uses_fsdp(lay, cfg, a) or pol.fsdp_cpu_offload  # it asks for one-rank FSDP too
    cast_w = a == 2 and wb == 4  # autocast makes bf16 copies of fp32 weights
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
    blk = pc["block"] / lay.tp
    head_w = m.vocab_size * m.dim / lay.tp  # the output projection's weight (tied or not)
    out = Estimate(pol)
    base, hst = {}, out.host
    grads_full = 0.0
    if pol.fsdp_cpu_offload:
        hst["parameters"], hst["gradients"], hst["optimizer"] = 4 * p_local, 4 * p_local, 8 * p_local
    else:
        base["parameters"] = 4 * p_local
        grads_full = 4 * p_local
        if pol.optimizer_offload:
            hst["optimizer"] = 16 * p_local  # fp32 master + m + v + gradient staging
        else:
            base["optimizer"] = 8 * p_local
    # Gradients are set to None after each step, so during backward only those already produced
    # exist: at its start (where activations peak) the output projection's, no block's. With FSDP
    # that one is the root's unsharded gradient in param_dtype, reduced when the root's backward
    # ends; the blocks' sharded fp32 gradients grow as their activations are freed. With gradient
    # accumulation every micro-batch after the first finds all gradients in place.
    # (the root's unsharded gradient is on the GPU under FSDP CPU offload too, until it is reduced)
    head_grad = (wb if fsdp_on else 4) * head_w
    accum = cfg.schedule.grad_accum > 1
    # saved activations
    nb = _blocks_per_rank(m, lay)
    mode = pol.recompute
    per_block = layer_activation_bytes(m, lay, a, mode, pol.selective_save, bool(pol.tiled_mlp), r)
    core_blocks = nb["core_iters"] * m.n_core if m.arch == "looped" else 0
    ckpt_inputs = 0.0  # bytes of checkpoint inputs (what offload moves)
    other_saved = 0.0
    if mode == "none":
        other_saved += per_block * nb["plain"] * T
    else:
        ckpt_inputs += r * dt * nb["plain"] * T
        other_saved += (per_block - r * dt) * nb["plain"] * T
    if core_blocks:
        if pol.recompute_loops:
            ckpt_inputs += r * dt * nb["core_iters"] * T
        elif mode == "none":
            other_saved += per_block * core_blocks * T
        else:
            ckpt_inputs += r * dt * core_blocks * T
            other_saved += (per_block - r * dt) * core_blocks * T
    phi = pol.offload_fraction
    if phi and mode == "none" and not pol.recompute_loops:  # offload everything saved
        ckpt_inputs, other_saved = ckpt_inputs + other_saved, 0.0
    acts = {"activations": other_saved + (1 - phi) * ckpt_inputs}
    if phi:
        hst["offloaded activations"] = phi * ckpt_inputs
    # the head's norm keeps the last block's output (a tiled loss keeps it too: its chunks are views)
    acts["head input"] = (r * dt + 4 / lay.tp) * T
    # weight copies: autocast's bf16 copies of fp32 weights are saved by the matmuls that use them
    # (all blocks with no recompute, only the block being recomputed otherwise; the output
    # projection's unless the loss is tiled, whose chunks recast it when recomputed). At the end
    # of forward autocast's cache still holds a copy of every weight. FSDP2 instead keeps the
    # root's unsharded weights (embedding, head: reshard_after_forward=False) for the whole step
    # and gathers one block ahead.
    comm = {}
    saved_w = cache_w = 0.0
    if cast_w:
        saved_w = (2 * n_blocks_stage * blk if mode == "none" else 0) + (0 if pol.tiled_loss else 2 * head_w)
        cache_w = 2 * (n_blocks_stage * blk + head_w)
    if fsdp_on:
        comm["fsdp unsharded root"] = wb * ends / lay.tp
        if m.arch == "looped" and core_blocks:
            # the looped core is one unit gathered for all its iterations (reshard_after_forward=False,
            # parallel.fsdp): its n_core blocks stay unsharded from its forward to its backward
            comm["fsdp unsharded root"] += wb * m.n_core * blk
    # ---- the loss: [c, V] logits, c = T or the tiled chunk ----------------------------------
    v_local = m.vocab_size / lay.tp
    c = min(T, pol.tiled_loss) if pol.tiled_loss else T
    # forward: bf16 logits, their fp32 copy (.float()) and the fp32 log-softmax, all alive at once;
    # backward: the saved log-softmax, nll_loss's dense [c, V] gradient and log_softmax's output
    # gradient (the bf16 logits are freed by then) -- 12 bytes per logit, the larger
    ce_fwd = (a + 8 if a == 2 else 8) * v_local * c
    ce_bwd = 12 * v_local * c
    if pol.tiled_loss:
        # per chunk, a recomputed bf16 copy of the weight, its bf16 gradient and the fp32 copy of
        # that added into .grad; the chunks' gradients w.r.t. h are kept until one concatenation
        w_tr = (2 + 2 + 4) * head_w if cast_w else wb * head_w
        loss_bwd = ce_bwd + w_tr + 2 * r * dt * T
        loss_fwd = ce_fwd
    else:
        loss_bwd = ce_bwd + (a * dt * T if cast_w or r != a else 0)  # + the projection's saved input
        loss_fwd = ce_fwd + (a * dt * T if cast_w or r != a else 0)
    # ---- the backward of one block: the largest over blocks is the first one (all saved) ------
    none_terms = block_saved_terms(m, lay, a, r, bool(pol.tiled_mlp))
    none_bytes = sum(none_terms.values())
    kept = layer_activation_bytes(m, lay, a, mode, pol.selective_save, bool(pol.tiled_mlp), r)
    recomputed = 0.0 if mode == "none" else none_bytes - kept  # per token
    if pol.tiled_mlp:  # one chunk's intermediates, their gradients and (fp32 stream) its input casts
        mlp_tr = (6 * a * f + (2 * a * d if r != a else 0)) / pol.tiled_mlp
    else:  # MLP backward: silu(g) and up saved, d(product) in, d(silu) and d(up) out: +2 [T, f]
        mlp_tr = 2 * a * f
    # attention backward, once the MLP's tensors are freed: dq, dk, dv, the kernel's fp32 dq
    # accumulator, and with Ulysses the all-to-all send/receive buffers of those gradients
    attn_tr = (a * (qd + 2 * kvd) + 4 * qd + (2 * a * (qd + 2 * kvd) if lay.sp > 1 else 0)
               - none_terms["mlp"] - none_terms["ffn_norm out"])
    work = recomputed + max(mlp_tr, attn_tr) + r * dt  # + the incoming gradient of the residual
    if pol.recompute_loops and core_blocks:
        layer = (none_bytes * m.n_core if mode == "none" else none_bytes + r * dt * m.n_core) + max(mlp_tr, attn_tr)
        work = max(work, layer)
    layer_ws = work * T + (2 * blk if cast_w and mode != "none" else 0) + (6 if cast_w else 4) * blk  # + its weight grads
    if lay.tp > 1:
        comm["tp all-gather"] = 2 * a * T * d
    if fsdp_on:  # current + prefetched block, its unsharded gradients and their fp32 reduce-scatter copy
        red = 4 * blk if cfg.parallel.reduce_dtype == "fp32" and wb != 4 else 0
        # under CPU offload a block's fp32 shard is copied in before its gather and its reduced
        # fp32 gradient waits on the GPU for its copy out
        red += 8 * blk if pol.fsdp_cpu_offload else 0
        comm["fsdp block gathers"] = 2 * wb * blk + wb * blk + red
    # ---- the phases --------------------------------------------------------------------------
    g_acc = grads_full if accum else 0.0
    # the head's gradient on top: none yet, or (accumulating, no FSDP) already inside grads_full;
    # under FSDP the root's unsharded gradient comes on top of the sharded ones
    g_head = (head_grad if fsdp_on else 0.0) if accum else head_grad
    phases = {
        "forward (loss)": {**base, "gradients": g_acc + (g_head if accum else 0), **acts,
                           "weight copies": cache_w, **{k: v for k, v in comm.items() if k != "tp all-gather"},
                           "logits/loss": loss_fwd},
        "backward (loss)": {**base, "gradients": g_acc + (g_head if (pol.tiled_loss or accum) else 0),
                            **acts, "weight copies": saved_w, **{k: v for k, v in comm.items() if k == "fsdp unsharded root"},
                            "logits/loss": loss_bwd},
        "backward (first block)": {**base, "gradients": g_acc + g_head, "activations": acts["activations"],
                                   "weight copies": saved_w, "layer working set": layer_ws, **comm},
        "optimizer step": {**base, "gradients": grads_full},
    }
    if phi:
        # the host rows of the current block's input and of each prefetched one, back on the GPU
        # (a prefetched input is rebuilt whole and its GPU part freed, memory.offload), plus one
        # more: offload rows measured 4-12% above this estimate (docs/performance.md)
        phases["backward (first block)"]["offload buffers"] = (cfg.memory.offload_prefetch + 2) * r * dt * T * phi
    out.phase_terms = {k: {n: int(x) for n, x in v.items() if x} for k, v in phases.items()}
    out.phases = {k: sum(v.values()) for k, v in out.phase_terms.items()}
    out.phase = max(out.phases, key=out.phases.get)
    out.gpu = dict(out.phase_terms[out.phase])
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


# offload fractions tried, in steps of 1/20: where the host cannot take every layer input and the
# GPU cannot keep three quarters of them, the fitting fraction lies between two quarter steps
# (Llama-3-8B, 1M tokens, sp=2 on two H200s with 120 GiB of host memory each: 0.9)
OFFLOAD_STEPS = 20
SHOWN_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)  # rows `longtrain plan` prints (plus the chosen one)


def candidate_policies(cfg: Config, lay: Layout) -> list[Policy]:
    """Cheapest first: least recompute, then least offload, then tiled MLP (with each offload
    fraction), then optimizer offload, then FSDP CPU offload (parameters and gradients too). Offload fractions go in steps of 1/``OFFLOAD_STEPS``.

    The tiled loss joins from the second rung on: it recomputes only the output projection (one
    [T, dim] x [dim, vocab] product), less than any block recompute, and removes the largest
    tensor of the step, the [T, vocab] logits.
    """
    looped = cfg.model.arch == "looped"
    mlp, loss = tiling_sizes(cfg, lay)
    ladder = [Policy("none"), Policy("none", tiled_loss=loss), Policy("selective", tiled_loss=loss),
              Policy("full", tiled_loss=loss)]
    fractions = tuple(round(k / OFFLOAD_STEPS, 4) for k in range(1, OFFLOAD_STEPS + 1))
    full = Policy("full", tiled_loss=loss)

    def offload_rungs(base: Policy, zero_for: tuple = ()) -> list:
        # ``base`` with each offload fraction (and none, for the recompute_loops values in
        # ``zero_for``). A looped model tries each group twice: every core block's input saved
        # (cheaper: each block is recomputed once; the host takes what offload moves), then
        # recompute_loops (one input per iteration: less to keep or move, a second recompute)
        out = []
        for loops in ((False, True) if looped else (False,)):
            b = dataclasses.replace(base, recompute_loops=loops)
            out += [dataclasses.replace(b, offload_fraction=phi)
                    for phi in ((0.0,) if loops in zero_for else ()) + fractions]
        return out

    ladder += offload_rungs(full, zero_for=(True,))  # plain full recompute is the rung above
    # tiled MLP recomputes each chunk's intermediate once more, so it comes after every offload
    # rung; with it, a partial offload often fits where the host cannot take every layer input
    tiled = dataclasses.replace(full, tiled_mlp=mlp)
    ladder += offload_rungs(tiled, zero_for=(False, True))
    ladder += offload_rungs(dataclasses.replace(tiled, optimizer_offload=True))
    # last, FSDP2's CPU offload: parameters and gradients go to the host as well (16 bytes a
    # parameter off the GPU, against 12 for optimizer offload), paid for by a host-to-device copy
    # of every unit's weights at each gather and torch's CPU AdamW
    ladder += offload_rungs(dataclasses.replace(tiled, fsdp_cpu_offload=True))
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
             "head input": "head-in", "offload buffers": "offbuf", "layer working set": "layerws",
             "logits/loss": "loss", "tp all-gather": "tp-ag", "fsdp unsharded root": "fsdp-rt",
             "fsdp block gathers": "fsdp-blk", "weight copies": "wcopies"}
    cols = ["policy".ljust(40)] + [short.get(k, k)[:8].rjust(8) for k in keys] + \
           ["GPU GiB".rjust(8), "host GiB".rjust(8), "peak at".ljust(22), " fits"]
    lines = [head, "", " ".join(cols)]
    for e in p.rows:
        if e is not p.chosen and e.policy.offload_fraction not in SHOWN_FRACTIONS:
            continue  # the fine offload steps between quarters: only the chosen one is shown
        fits = e.gpu_total <= usable(p.budget) and e.host_total <= p.host_budget
        mark = " <- chosen" if e is p.chosen else ("  yes" if fits else "  no")
        vals = [_gib(e.gpu.get(k, 0)) for k in keys]
        lines.append(" ".join([e.policy.name.ljust(40)] + vals +
                              [_gib(e.gpu_total), _gib(e.host_total), e.phase.ljust(22), mark]))
    lines.append(f"\nterms at the moment of each row's peak (see longtrain.memory.planner's docstring); "
                 f"offload fractions are tried in steps of 1/{OFFLOAD_STEPS}, quarters shown")
    if p.chosen is None:
        lines.append("nothing fits; see the error for what to change.")
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
