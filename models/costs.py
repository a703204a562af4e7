"""What a model costs, from its config alone: parameters by part, matmul weights and FLOPs per token.

Owns the one cost model of the repository: ``count_params`` (exact, as ``sum(p.numel())`` of the
built model; the memory planner's static terms), ``matmul_params_per_token`` and
``flops_per_token`` (the MFU the trainer and the benchmarks report), and the per-part terms
``models.units.unit_cost`` adds up for one unit (the pipeline split's balance). Everything takes
a ``ModelConfig`` (``cfg.model``) because the planner and the pipeline split run before any model
is built; a built model answers the same through ``DescribedModel.param_counts`` /
``flops_per_token``.

Counting. A matmul does 2 FLOPs per weight per token forward; backward is twice the forward.
Attention scores and the weighted sum do 2 x 2 x seq x (n_heads x head_dim) per token and layer
forward counting the full square (what Megatron and torchtitan report); only the lower triangle
is computed under a causal mask, so the causal count halves it. A looped core counts once per
iteration, with that iteration's LoRA deltas and, from the second iteration on, the ``concat``
re-injection projection. The embedding lookup multiplies nothing.

Looped variants: a ``gdn`` core layer (``models.linear_attention``) has its own projections and
replaces the O(S) attention term by the chunked gated delta rule's, which does not grow with the
sequence (``gdn_flops_per_token``); hyper-connected streams add their small mixing tables, counted
like weights multiplied per token.
"""

from __future__ import annotations


GDN_CHUNK = 64  # models.linear_attention.CHUNK (not imported: costs stay free of torch)


def core_mixers(m) -> list[str]:
    """``full`` or ``gdn`` for each core layer (``models.looped.core_mixers``)."""
    return list(m.core_attention) or ["full"] * m.n_core


def _lora_in_out(m, mixer: str = "full") -> list[tuple[int, int]]:
    """(in, out) of every linear a per-loop LoRA modifies (``models.looped.LORA_TARGETS``)."""
    d, f, qd, kvd = m.dim, m.ffn_dim, m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim
    kvd = qd if mixer == "gdn" else kvd  # a gdn layer has one key and value per head
    return [(d, qd), (d, kvd), (d, kvd), (qd, d), (d, f), (f, d), (d, f)]


def gdn_block_matmul_params(m) -> int:
    """A gdn core layer: wq, wk, wv, wg, wo (d x heads*head_dim), wa, wb (d x heads), the MLP."""
    qd = m.n_heads * m.head_dim
    return 5 * m.dim * qd + 2 * m.dim * m.n_heads + 3 * m.dim * m.ffn_dim


def gdn_flops_per_token(m) -> float:
    """Forward FLOPs per token of one gated delta rule layer's recurrence (chunked, C tokens a
    chunk, per head with dk = dv = head_dim): k k^T and q k^T within the chunk (2 x 2C dk), the
    triangular solve applied to [k, v] (C (dk + dv)), the intra-chunk output (2C dv) and three
    products with the [dk, dv] state (6 dk dv). Independent of the sequence length."""
    C, dk = GDN_CHUNK, m.head_dim
    return m.n_heads * (4.0 * C * dk + C * 2 * dk + 2.0 * C * dk + 6.0 * dk * dk)


def hyper_params(m) -> int:
    """Hyper-connection tables: read, mix, write per iteration up to loops_max, and the reduce."""
    n = m.hyper_streams if m.arch == "looped" else 1
    return 0 if n == 1 else m.loops_max * (2 * n + n * n) + n


def block_matmul_params(m) -> int:
    """Weights one transformer block multiplies per token: wq, wk, wv, wo, w1, w2, w3."""
    qd, kvd = m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim
    return 2 * m.dim * qd + 2 * m.dim * kvd + 3 * m.dim * m.ffn_dim


def norm_params(m) -> int:
    """Norm weights of one block: two input norms, two output norms under Peri-LN, and the
    per-head query and key norms (one ``head_dim`` weight each) under QK-norm. Norms multiply no
    weights, so like every elementwise op they add nothing to the FLOP counts below."""
    return (4 if m.norm_placement == "peri" else 2) * m.dim + (2 * m.head_dim if m.qk_norm else 0)


def block_params(m) -> int:
    """Parameters of one transformer block: its matmul weights, its norm weights and, under
    ``model.sigma_reparam``, one gain per linear (7)."""
    return norm_params(m) + block_matmul_params(m) + (7 if m.sigma_reparam else 0)


def lora_matmul_params(m) -> int:
    """Weights one core iteration's LoRA deltas multiply per token (x A_i^T, then B_i^T)."""
    if m.arch != "looped" or m.lora_rank == 0:
        return 0
    return m.lora_rank * sum(i + o for mixer in core_mixers(m) for i, o in _lora_in_out(m, mixer))


def lora_params(m) -> int:
    """Parameters of the looped core's per-loop LoRA tables (one pair per iteration up to loops_max)."""
    return m.loops_max * lora_matmul_params(m)


def reinject_params(m) -> int:
    """The ``concat`` re-injection projection [2d -> d] of a looped model (0 otherwise)."""
    return 2 * m.dim * m.dim if m.arch == "looped" and m.reinject == "concat" else 0


def loop_iteration_matmul_params(m, iteration: int) -> int:
    """Weights iteration ``iteration`` (0-based) of a looped core multiplies per token."""
    layers = sum(gdn_block_matmul_params(m) if mixer == "gdn" else block_matmul_params(m) for mixer in core_mixers(m))
    hyper = m.dim * (m.hyper_streams ** 2 + 2 * m.hyper_streams) if m.hyper_streams > 1 else 0
    return layers + lora_matmul_params(m) + (reinject_params(m) if iteration >= 1 else 0) + hyper


def core_mixer_flops_per_token(m, seq_len: int, causal: bool) -> float:
    """Forward FLOPs per token of the token mixing of one core iteration (attention or gdn)."""
    return sum(gdn_flops_per_token(m) if mixer == "gdn" else attention_flops_per_token(m, seq_len, causal)
               for mixer in core_mixers(m))


def head_matmul_params(m) -> int:
    """The output projection [d -> vocab]."""
    return m.dim * m.vocab_size


def count_params(m) -> dict:
    """Exact parameter counts of ``build_model(m)`` by part (tied embeddings counted once)."""
    emb = m.vocab_size * m.dim
    head = m.dim + (0 if m.tie_embeddings else m.vocab_size * m.dim)
    n_blocks = m.n_layers if m.arch == "llama" else m.n_prelude + m.n_core + m.n_coda
    extra = lora_params(m) + reinject_params(m) + hyper_params(m) + \
        (m.dim if m.arch == "looped" and m.loop_norm else 0)
    gdn = core_mixers(m).count("gdn") if m.arch == "looped" else 0
    # norms (no QK-norm: the gated delta rule L2-normalises q and k itself), the decay bias, matmuls
    # and, under σReparam, one gain per reparameterised linear: wq, wk, wv, wg, wo and the MLP's
    # three (the gates wa, wb stay plain: models.linear_attention.GatedDeltaNet.SIGMA_REPARAM)
    gdn_block = ((4 if m.norm_placement == "peri" else 2) * m.dim + m.n_heads + gdn_block_matmul_params(m)
                 + (8 if m.sigma_reparam else 0))
    blocks = (n_blocks - gdn) * block_params(m) + gdn * gdn_block
    # "block": the largest block (what one FSDP unit gathers; the planner's per-block terms)
    return {"embedding": emb, "blocks": blocks, "block": max(block_params(m), gdn_block if gdn else 0),
            "n_blocks": n_blocks,
            "head": head, "extra": extra, "total": emb + blocks + head + extra}


def matmul_params_per_token(m) -> int:
    """Weights multiplied per token in one forward pass (embedding lookup excluded; a looped core
    counts once per iteration, since each iteration multiplies by it again)."""
    total = head_matmul_params(m)
    if m.arch == "llama":
        return total + m.n_layers * block_matmul_params(m)
    total += (m.n_prelude + m.n_coda) * block_matmul_params(m)
    return total + sum(loop_iteration_matmul_params(m, i) for i in range(m.loops))


def attention_flops_per_token(m, seq_len: int, causal: bool) -> float:
    """Forward FLOPs per token of one attention layer's scores and weighted sum."""
    full = 4.0 * seq_len * m.n_heads * m.head_dim
    return full / 2 if causal else full


def loss_flops_per_token(m) -> float:
    """The softmax / cross-entropy over the logits, about one more pass over them (not a matmul,
    so not in ``flops_per_token``; the pipeline split counts it as the head's work)."""
    return 2.0 * m.vocab_size


def flops_per_token(m, seq_len: int, causal: bool) -> float:
    """Training FLOPs (forward + backward = 3 x forward) per token at sequence length ``seq_len``."""
    dense = 2 * matmul_params_per_token(m)
    if m.arch == "llama":
        return 3.0 * (dense + attention_flops_per_token(m, seq_len, causal) * m.n_layers)
    mixing = (attention_flops_per_token(m, seq_len, causal) * (m.n_prelude + m.n_coda)
              + core_mixer_flops_per_token(m, seq_len, causal) * m.loops)
    return 3.0 * (dense + mixing)
