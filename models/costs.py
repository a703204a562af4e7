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
"""

from __future__ import annotations


def _lora_in_out(m) -> list[tuple[int, int]]:
    """(in, out) of every linear a per-loop LoRA modifies (``models.looped.LORA_TARGETS``)."""
    d, f, qd, kvd = m.dim, m.ffn_dim, m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim
    return [(d, qd), (d, kvd), (d, kvd), (qd, d), (d, f), (f, d), (d, f)]


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
    """Parameters of one transformer block: its matmul weights and its norm weights."""
    return norm_params(m) + block_matmul_params(m)


def lora_params(m) -> int:
    """Parameters of the looped core's per-loop LoRA tables (one pair per iteration up to loops_max)."""
    if m.arch != "looped" or m.lora_rank == 0:
        return 0
    return m.n_core * m.loops_max * m.lora_rank * sum(i + o for i, o in _lora_in_out(m))


def lora_matmul_params(m) -> int:
    """Weights one core iteration's LoRA deltas multiply per token (x A_i^T, then B_i^T)."""
    if m.arch != "looped" or m.lora_rank == 0:
        return 0
    return m.n_core * m.lora_rank * sum(i + o for i, o in _lora_in_out(m))


def reinject_params(m) -> int:
    """The ``concat`` re-injection projection [2d -> d] of a looped model (0 otherwise)."""
    return 2 * m.dim * m.dim if m.arch == "looped" and m.reinject == "concat" else 0


def loop_iteration_matmul_params(m, iteration: int) -> int:
    """Weights iteration ``iteration`` (0-based) of a looped core multiplies per token."""
    return m.n_core * block_matmul_params(m) + lora_matmul_params(m) + (reinject_params(m) if iteration >= 1 else 0)


def head_matmul_params(m) -> int:
    """The output projection [d -> vocab]."""
    return m.dim * m.vocab_size


def count_params(m) -> dict:
    """Exact parameter counts of ``build_model(m)`` by part (tied embeddings counted once)."""
    emb = m.vocab_size * m.dim
    head = m.dim + (0 if m.tie_embeddings else m.vocab_size * m.dim)
    n_blocks = m.n_layers if m.arch == "llama" else m.n_prelude + m.n_core + m.n_coda
    extra = lora_params(m) + reinject_params(m) + (m.dim if m.arch == "looped" and m.loop_norm else 0)
    blocks = n_blocks * block_params(m)
    return {"embedding": emb, "blocks": blocks, "block": block_params(m), "n_blocks": n_blocks,
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
    attn = attention_flops_per_token(m, seq_len, causal) * m.n_unrolled_layers
    return 3.0 * (dense + attn)
