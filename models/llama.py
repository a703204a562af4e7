"""A Llama-style decoder in plain PyTorch, plus the blocks the looped transformer reuses.

Owns: ``Attention`` (grouped-query, rotary, optionally QK-norm), ``FeedForward`` (SwiGLU),
``Block`` (pre-norm or Peri-LN residual), ``LMHead`` (final norm + output projection + summed
cross-entropy, optionally with z-loss) and ``Llama``,
which describes its units (``models.units``: the embedding, each block, the head) and runs any
contiguous run of them (``forward_units``; ``forward`` is the run of all of them).
No parallelism lives here: ``longtrain.parallel`` shards these modules from outside, swapping
``Attention.core`` for a sequence-parallel wrapper and distributing the ``nn.Linear`` weights.
Stability options (``model.norm_placement``, ``model.qk_norm``, ``optim.z_loss``; off by default):
Peri-LN normalises each sublayer's output as well as its input, inside the residual branch
(``x + norm_out(f(norm_in(x)))``), so no branch can add an ever larger update to the stream;
QK-norm is an RMSNorm over ``head_dim`` on every query and key head before rotary (Qwen3's
attention), which bounds the attention logits; z-loss adds ``c * logsumexp(logits)^2`` per token,
pulling the softmax normaliser towards 1 so output logits cannot drift; σReparam
(``model.sigma_reparam``, ``models.sigma_reparam``) makes every linear of a block compute with
``gamma / sigma(W) * W``.
Names follow torchtitan (``wq``/``wk``/``wv``/``wo``, ``w1``/``w2``/``w3``); ``layers`` is a
``ModuleDict`` keyed by layer index so parameter names stay the same when a pipeline stage drops
the layers it does not own.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from longtrain.models import sigma_reparam
from longtrain.models.attention import CoreAttention
from longtrain.models.rope import Rotary, apply_rotary
from longtrain.models.units import BLOCK, EMBEDDING, HEAD, BlockRef, DescribedModel, ShardUnit, Unit

IGNORE_INDEX = -100


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, backend: str = "auto", qk_norm: bool = False,
                 eps: float = 1e-5):
        super().__init__()
        self.head_dim = dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        # one weight of size head_dim shared by all heads: replicated under tensor parallelism
        self.q_norm = nn.RMSNorm(self.head_dim, eps=eps) if qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=eps) if qk_norm else None
        self.core = CoreAttention(backend)

    def forward(self, x, cos, sin, doc_ids=None):
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        # head counts come from the projections, so tensor-parallel shards (fewer local heads) and
        # sequence-parallel slices (shorter local sequence) both reshape correctly
        q = q.view(*q.shape[:2], -1, self.head_dim)
        k = k.view(*k.shape[:2], -1, self.head_dim)
        v = v.view(*v.shape[:2], -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = self.core(q, k, v, doc_ids)
        return self.wo(out.reshape(*out.shape[:2], -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm residual block; with ``norm_placement=peri`` each sublayer's output is normalised too."""

    def __init__(self, cfg):
        super().__init__()
        peri = cfg.norm_placement == "peri"
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.attn_backend, cfg.qk_norm, cfg.norm_eps)
        self.attention_out_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps) if peri else None
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)
        self.ffn_out_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps) if peri else None
        if cfg.sigma_reparam:  # every linear of the block: W used as gamma / sigma(W) * W
            sigma_reparam.reparameterise_linears_(self)

    def forward(self, x, cos, sin, doc_ids=None):
        a = self.attention(self.attention_norm(x), cos, sin, doc_ids)
        x = x + (a if self.attention_out_norm is None else self.attention_out_norm(a))
        f = self.feed_forward(self.ffn_norm(x))
        return x + (f if self.ffn_out_norm is None else self.ffn_out_norm(f))


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, z_loss: float = 0.0) -> torch.Tensor:
    """Sum (not mean) of token losses, so ranks holding different token counts add up exactly;
    with ``z_loss`` > 0 each labelled token adds ``z_loss * logsumexp(logits)^2`` (PaLM's z-loss).

    With z-loss the cross-entropy is formed from the same log-normaliser (``log Z - logit[label]``)
    instead of calling ``F.cross_entropy`` beside a second ``logsumexp``: one pass over the float32
    logits instead of two, forward and backward (the logits are the largest tensor of the step)."""
    # at least float32 (bf16 logits are widened; float64 ones, in the tests, stay float64)
    flat = logits.to(torch.promote_types(logits.dtype, torch.float32)).reshape(-1, logits.shape[-1])
    lab = labels.reshape(-1)
    if z_loss <= 0:
        return F.cross_entropy(flat, lab, ignore_index=IGNORE_INDEX, reduction="sum")
    labelled = lab != IGNORE_INDEX
    log_z = torch.logsumexp(flat, dim=-1)
    picked = flat.gather(1, torch.where(labelled, lab, 0)[:, None]).squeeze(1)
    return torch.where(labelled, log_z - picked + z_loss * log_z.square(), 0.0).sum()


class LMHead(nn.Module):
    """Final norm and output projection; with labels, the summed cross-entropy instead of logits.

    ``z_loss`` (``optim.z_loss``, set through ``DescribedModel.set_z_loss``) is added in training
    mode only, so evaluation losses stay plain cross-entropy. Tiling (``memory.tiling``) runs this
    forward chunk by chunk, so the z-loss never sees more than one chunk's logits either.
    """

    def __init__(self, dim: int, vocab_size: int, eps: float):
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=eps)
        self.output = nn.Linear(dim, vocab_size, bias=False)
        self.z_loss = 0.0

    def logits(self, h):
        return self.output(self.norm(h))

    def forward(self, h, labels=None):
        logits = self.logits(h)
        if labels is None:
            return logits
        return cross_entropy_sum(logits, labels, self.z_loss if self.training else 0.0)


def init_block_(block: Block, std: float, depth_scale: float) -> None:
    for name, p in block.named_parameters():
        if p.ndim == 1:
            nn.init.ones_(p)
        elif name.endswith(("wo.weight", "w2.weight")):
            nn.init.trunc_normal_(p, std=std / depth_scale, a=-3 * std, b=3 * std)
        else:
            nn.init.trunc_normal_(p, std=std, a=-3 * std, b=3 * std)
    sigma_reparam.reset_(block)  # gamma = sigma(W_init), so the initial function is unchanged


def positions_for(units, x: torch.Tensor, position_ids):
    """``position_ids``, or 0..S-1 for every row when a run starting at the embedding has none
    (a later run cannot tell the positions of the hidden state it is given)."""
    if position_ids is not None:
        return position_ids
    if units[0].kind != EMBEDDING:
        raise ValueError(f"running units from {units[0].name!r} needs position_ids: only the tokens "
                         f"(a run starting at the embedding) imply the default 0..S-1.")
    return torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)


class Llama(DescribedModel):
    """Embedding, ``n_layers`` blocks (``layers.0`` ..), head. Its units: ``tok_embeddings``,
    ``layers.<i>`` (block index i), ``head``; every block is its own FSDP unit."""

    shared_modules = ("rotary",)

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layers)})
        self.head = LMHead(cfg.dim, cfg.vocab_size, cfg.norm_eps)
        if cfg.tie_embeddings:
            self.head.output.weight = self.tok_embeddings.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Deterministic under the current RNG state; also re-run after ``to_empty`` from meta."""
        std = self.cfg.init_std
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        for block in self.layers.values():
            init_block_(block, std, (2 * self.cfg.n_unrolled_layers) ** 0.5)
        nn.init.ones_(self.head.norm.weight)
        if not self.cfg.tie_embeddings:
            nn.init.trunc_normal_(self.head.output.weight, std=self.cfg.dim ** -0.5)
        self.rotary.reset_parameters()

    # ---------------------------------------------------------------- description (models.units)

    @classmethod
    def units_for(cls, cfg, n_loops: int | None = None) -> list[Unit]:
        return ([Unit("tok_embeddings", EMBEDDING, ("tok_embeddings",))]
                + [Unit(f"layers.{i}", BLOCK, (f"layers.{i}",), index=i) for i in range(cfg.n_layers)]
                + [Unit("head", HEAD, ("head",))])

    def blocks(self) -> list[BlockRef]:
        return [BlockRef(int(i), f"layers.{i}", b) for i, b in self.layers.items()]

    def shard_units(self) -> list[ShardUnit]:
        return [ShardUnit(ref.name, ref.module) for ref in self.blocks()]

    def loss_head(self) -> nn.Module | None:
        return self.head

    def forward_units(self, units, x, position_ids=None, doc_ids=None, labels=None):
        """Run ``units`` (a contiguous run of ``units()``) on ``x``: the tokens if the run starts
        with the embedding, else the hidden state the unit before it returned. Returns the hidden
        state, or after the head the logits (the summed loss with ``labels``)."""
        position_ids = positions_for(units, x, position_ids)
        cos, sin = self.rotary(position_ids)
        h = x
        for u in units:
            if u.kind == EMBEDDING:
                h = self.tok_embeddings(h)
            elif u.kind == BLOCK:
                h = self.layers[str(u.index)](h, cos, sin, doc_ids)
            else:
                return self.head(h, labels)
        return h

    def forward(self, tokens, position_ids=None, doc_ids=None, labels=None):
        """The whole model (or, once ``prune_to`` cut it to a run, that run; see ``forward_units``)."""
        return self.forward_units(self.units_to_run(), tokens, position_ids, doc_ids, labels)
