"""What one block keeps for backward, per token, by tensor, under each recompute mode.

Owns: the per-token widths of a block's tensors on one rank (``widths``), the tensors autograd
saves for one block with no recompute (``block_saved_terms``, with the stability options' share
``stability_saved_terms`` and a gated delta rule layer's ``gdn_block_saved_terms``), and what a
block keeps under ``none``, ``selective`` and ``full`` recomputation (``layer_activation_bytes``).
All are bytes per token of one block; how many blocks a stage runs, what offload moves to the
host and the peak of a step are ``memory.step_memory``'s.

Notation: d = model.dim, h = n_heads, kv = n_kv_heads, hd = d/h, f = ffn_dim, t = tp, s = sp,
a = bytes of an activation element (2 for bf16, 4 for fp32), r = bytes of the residual stream
(``memory.step_memory.residual_bytes``). Per rank and micro-batch a layer sees T = batch·seq/s
tokens (Ulysses splits the sequence; inside attention a rank holds all S tokens of h/s heads,
which is the same byte count). Widths per token on one rank: q and the attention output
qd = d/t; keys and values kvd = kv_eff·hd with kv_eff = kv/t, raised to lcm(kv/t, s) when
Ulysses has to replicate kv heads; MLP f/t. Tensor parallelism is assumed sequence-parallel
(norms and residuals sharded over t, projection inputs gathered).

When r != a (an fp32 stream under bf16 autocast) every linear casts its fp32 input itself
(autocast caches casts of leaf weights only): wq, wk, wv save three bf16 copies of the
attention-norm output, w1 and w3 two of the ffn-norm output.

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

Per recompute mode (per token and layer, ``layer_activation_bytes``):
    none ........ all of the above
    selective ... r·d/t (checkpoint input) + a·qd + 4h/t (attention output and logsumexp kept,
                  ``memory.selective``);
                  ``attention+mm`` adds every matmul output a·(qd + 2kvd + 2d + 2f/t),
                  ``attention+half_mm`` half of that
    full ........ r·d/t (the checkpoint input only: 8 KiB/token for Llama-3-8B under FSDP bf16)
    tiled MLP ... the chunk checkpoints keep the ffn-norm output (r·d) instead of its casts and the
                  4·a·f/t MLP intermediates; one chunk's worth is recomputed at a time
Looped variants: a gated delta rule core layer keeps its own terms (``gdn_block_saved_terms``:
six casts of the norm output, q and k before and after their L2 norm, v, the gates, the kernel's
fp32 [T, h, 64] chunk matrix, the output norm and gate; no rotary) and ``selective`` recomputes
it whole. These terms come from the code, not yet from a GPU.
"""

from __future__ import annotations

import math

from longtrain.models.costs import GDN_CHUNK
from longtrain.parallel.mesh import ParallelDims


def widths(m, lay: ParallelDims) -> dict:
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
    w = widths(m, lay)
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
    w = widths(m, lay)
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
    w = widths(m, lay)
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
    w = widths(m, lay)
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
