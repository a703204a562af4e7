"""Gated delta rule layers: the linear-time token mixer a looped core may use instead of attention.

Owns: ``GatedDeltaNet`` (the mixer a ``Block`` holds as ``attention`` for the core layers
``model.core_attention`` marks ``gdn``), ``GatedDeltaCore`` (q, k, v, gate, beta -> output: the
recurrence itself, the counterpart of ``models.attention.CoreAttention``), ``select_gdn_kernel``
(the one rule choosing its kernel) and ``gated_delta_chunked`` (the pure-PyTorch chunked reference).

The recurrence (Yang, Kautz & Hatamizadeh, "Gated Delta Networks"), per head, with a state
S in R^{d_k x d_v}, a decay alpha_t = exp(g_t) in (0, 1] and a write strength beta_t in (0, 1):

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,     o_t = scale * S_t^T q_t

q and k are L2-normalised per head (inside the core; so ``model.qk_norm`` adds no norm to a gdn
layer, while Peri-LN's output norm wraps it like attention, ``models.looped.core_block``). Cost
per token is O(d_k d_v) per head, independent of the sequence length: this is what makes a looped
core cheap at a million tokens. A document start sets alpha_t = 0 (g_t = -inf), which empties the
state exactly, so packed documents never see each other -- the block-diagonal mask of attention,
for free.

Kernels (``select_gdn_kernel``, one rule): ``fla`` is flash-linear-attention's Triton
``chunk_gated_delta_rule`` (CUDA only; packed documents go through its ``cu_seqlens``);
``reference`` is ``gated_delta_chunked`` below, chunk-parallel like fla's (the WY form: within a
chunk the delta-rule updates are one unit-triangular solve; across chunks a short sequential scan
of states), in float32. ``auto`` = fla on a CUDA device when the package is installed, else the
reference; ``model.gdn_kernel`` can force either. Every decay ratio is formed by summing log
gates (never subtracting cumulative sums), so the -inf of a document start gives exact zeros.

Layout follows attention: ``[batch, seq, heads, head_dim]`` and ``[batch, seq, heads]`` for the
gates, so tensor parallel shards heads through the projections and Ulysses' all-to-all swaps a
sequence shard for a head shard around ``GatedDeltaCore`` exactly as around attention
(``parallel.ulysses``): each head's recurrence needs the whole sequence, and only that head.
No short convolution on q/k/v (GDN's usual token shift): it would mix neighbouring tokens outside
the head-sharded core, i.e. across Ulysses' sequence shards.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from longtrain.config import ConfigError
from longtrain.models.sigma_reparam import SigmaReparamLinear

GDN_KERNELS = ("auto", "fla", "reference")
CHUNK = 64  # tokens per chunk, fla's size too (models.costs prices the chunked form with it)


@functools.lru_cache(maxsize=1)
def fla_available() -> bool:
    try:
        import fla.ops.gated_delta_rule  # noqa: F401
    except Exception:  # fla imports triton, which can fail in several ways on a machine without CUDA
        return False
    return fla_blocked(torch.device("cuda")) is None


def fla_blocked(device: torch.device) -> str | None:
    """Why fla cannot run here, or None. fla 0.6's gated backward refuses Hopper GPUs with Triton
    >= 3.4.0 and < 3.7.1 (wrong results, fla issue #640) unless tilelang is installed: seen on an
    H200 with torch 2.11's Triton 3.6.0, where it raised inside the first backward; with tilelang
    0.1.15 installed there fla ran and matched the reference (docs/performance.md)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    if torch.cuda.get_device_capability(device)[0] != 9:
        return None
    try:
        import triton
    except ImportError:
        return None
    version = tuple(int(x) for x in triton.__version__.split("+")[0].split(".")[:3] if x.isdigit())
    if (3, 4, 0) <= version < (3, 7, 1):
        try:
            import tilelang  # noqa: F401
            return None
        except ImportError:
            return (f"fla's gated backward refuses Hopper GPUs with Triton {triton.__version__} (needs >= 3.7.1 "
                    f"or the tilelang package)")
    return None


def select_gdn_kernel(requested: str, device: torch.device) -> str:
    """The kernel for one call: ``fla`` on CUDA with flash-linear-attention installed, else
    ``reference``; ``model.gdn_kernel`` = fla / reference forces one."""
    if requested not in GDN_KERNELS:
        raise ValueError(f"model.gdn_kernel={requested!r} is unknown; choose one of {list(GDN_KERNELS)}.")
    if requested == "auto":
        return "fla" if device.type == "cuda" and fla_available() else "reference"
    if requested == "fla" and not (device.type == "cuda" and fla_available()):
        blocked = fla_blocked(device)
        raise ConfigError(f"model.gdn_kernel=fla needs a CUDA device and a usable flash-linear-attention "
                           f"(pip install flash-linear-attention); this run has device {device.type}"
                           f"{f' and {blocked}' if blocked else ('' if fla_available() else ' and no fla package')}"
                           f"; set model.gdn_kernel=auto.")
    return requested


def describe_gdn_kernel(requested: str, device: torch.device) -> str:
    """One line for the start-up log."""
    how = "auto-selected" if requested == "auto" else "set by model.gdn_kernel"
    return f"gated delta rule: {select_gdn_kernel(requested, device)} ({how})"


def document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """Boolean [B, S]: True where a token begins a new document (not at position 0, where the
    state is empty anyway)."""
    starts = torch.zeros_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return starts


def _segment_sums(g: torch.Tensor) -> torch.Tensor:
    """[..., C] log gates -> [..., C, C] with entry (t, j) = g_{j+1} + .. + g_t for j <= t and
    -inf above the diagonal, by masked cumulative sums (no differences of cumulative sums, so a
    -inf gate stays an exact zero after exp and no inf - inf appears)."""
    C = g.shape[-1]
    x = g[..., :, None].expand(*g.shape, C)  # x[..., t, j] = g_t
    below = torch.ones(C, C, dtype=torch.bool, device=g.device).tril(-1)
    x = x.masked_fill(~below, 0.0)
    sums = x.cumsum(dim=-2)  # sums[t, j] = sum over j < s <= t of g_s
    return sums.masked_fill(~torch.ones_like(below).tril(), float("-inf"))


def gated_delta_chunked(q, k, v, g, beta, scale: float, doc_ids=None, chunk: int = CHUNK) -> torch.Tensor:
    """The recurrence of the module docstring, chunk-parallel, in float32 (float64 inputs: float64).

    q, k: [B, S, H, Dk] (already L2-normalised), v: [B, S, H, Dv], g (log decay, <= 0) and beta:
    [B, S, H], doc_ids: [B, S] or None. Returns [B, S, H, Dv] in v's dtype.

    Within a chunk of C tokens, with gamma_t the product of the decays from the chunk start to t,
    the state written by token t is k_t u_t^T with u = (I + A)^-1 diag(beta) (V - diag(gamma) K S_0)
    and A_tj = beta_t (gamma_t / gamma_j) k_t.k_j for j < t: a unit-triangular solve, the same for
    every chunk, which leaves one [Dk, Dv] state hand-over per chunk sequential.
    """
    with torch.autocast(q.device.type, enabled=False):  # at least float32 throughout
        return _chunked(q, k, v, g, beta, scale, doc_ids, chunk).to(v.dtype)


def _chunked(q, k, v, g, beta, scale: float, doc_ids, chunk: int) -> torch.Tensor:
    B, S, H, Dk = q.shape
    Dv = v.shape[-1]
    dtype = torch.promote_types(v.dtype, torch.float32)  # float64 inputs stay float64 (tests)
    q, k, v, g, beta = (t.to(dtype) for t in (q, k, v, g, beta))
    if doc_ids is not None:
        g = g.masked_fill(document_starts(doc_ids)[..., None], float("-inf"))
    pad = (-S) % chunk
    if pad:  # trailing zeros: no key, no value, no decay -- they change nothing before them
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
        g, beta = (F.pad(t, (0, 0, 0, pad)) for t in (g, beta))
    N = (S + pad) // chunk

    def chunks(t):  # [B, S, H, ...] -> [B, H, N, C, ...]
        t = t.reshape(B, N, chunk, H, *t.shape[3:])
        return t.movedim(3, 1)

    q, k, v, g, beta = chunks(q) * scale, chunks(k), chunks(v), chunks(g), chunks(beta)
    seg = _segment_sums(g)  # [B, H, N, C, C]
    decay = seg.exp()  # gamma_t / gamma_j below and on the diagonal, 0 above
    from_start = g.cumsum(-1).exp()  # gamma_t: the decay from the chunk start to t
    to_end = seg[..., -1, :].exp()  # gamma_C / gamma_j: from j to the chunk end
    kk = k @ k.transpose(-1, -2)
    A = (beta[..., None] * decay * kk).tril(-1)
    eye = torch.eye(chunk, device=q.device, dtype=q.dtype)
    solve = functools.partial(torch.linalg.solve_triangular, eye + A, upper=False, unitriangular=True)
    w_v = solve(beta[..., None] * v)  # the state-free part of u
    w_k = solve((beta * from_start)[..., None] * k)  # u = w_v - w_k S_0
    qk = (q @ k.transpose(-1, -2)) * decay  # causal (decay is 0 above the diagonal)
    state = q.new_zeros(B, H, Dk, Dv)
    outs = []
    for n in range(N):  # the only sequential part: one state hand-over per chunk
        u = w_v[:, :, n] - w_k[:, :, n] @ state
        outs.append(from_start[:, :, n, :, None] * (q[:, :, n] @ state) + qk[:, :, n] @ u)
        state = from_start[:, :, n, -1, None, None] * state + k[:, :, n].transpose(-1, -2) @ (to_end[:, :, n, :, None] * u)
    o = torch.stack(outs, dim=2)  # [B, H, N, C, Dv]
    return o.movedim(1, 3).reshape(B, N * chunk, H, Dv)[:, :S]


def _gated_delta_fla(q, k, v, g, beta, scale: float, doc_ids=None) -> torch.Tensor:
    """fla's chunked kernel; q and k are L2-normalised inside it (fused, in float32)."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    q, k, beta = q.to(v.dtype), k.to(v.dtype), beta.to(v.dtype)  # one dtype for the kernel's inputs
    if doc_ids is None:
        out, _ = chunk_gated_delta_rule(q, k, v, g.float(), beta, scale=scale, use_qk_l2norm_in_kernel=True)
        return out
    B, S = doc_ids.shape
    # packed documents: the batch flattened into one row, each document its own sequence
    starts = document_starts(doc_ids)
    starts[:, 0] = True
    begin = torch.nonzero(starts.reshape(-1)).flatten()
    cu = torch.cat([begin, begin.new_tensor([B * S])])
    flat = [t.reshape(1, B * S, *t.shape[2:]) for t in (q, k, v, g.float(), beta)]
    out, _ = chunk_gated_delta_rule(*flat, scale=scale, cu_seqlens=cu, use_qk_l2norm_in_kernel=True)
    return out.reshape(v.shape)


class GatedDeltaCore(nn.Module):
    """(q, k, v, g, beta) -> output over whole sequences, head by head; ``parallel.ulysses`` wraps
    it like ``CoreAttention``. q and k arrive unnormalised: the L2 norm per head is part of the
    core, fused into fla's kernel and in float32 before the reference."""

    def __init__(self, kernel: str = "auto"):
        super().__init__()
        if kernel not in GDN_KERNELS:
            raise ValueError(f"model.gdn_kernel={kernel!r} is unknown; choose one of {list(GDN_KERNELS)}.")
        self.kernel = kernel

    def forward(self, q, k, v, g, beta, doc_ids=None):
        scale = q.shape[-1] ** -0.5
        if select_gdn_kernel(self.kernel, q.device) == "fla":
            return _gated_delta_fla(q, k, v, g, beta, scale, doc_ids)
        wide = torch.promote_types(v.dtype, torch.float32)
        with torch.autocast(q.device.type, enabled=False):
            q, k = (F.normalize(t.to(wide), dim=-1) for t in (q, k))
        return gated_delta_chunked(q, k, v, g, beta, scale, doc_ids)


class GatedDeltaNet(nn.Module):
    """The token mixer of a ``gdn`` core layer: ``Block.attention``'s place and call signature
    (rotary tables are accepted and unused: the decay orders the tokens).

    Projections: ``wq, wk, wv`` (d -> heads x head_dim), ``wa`` (d -> heads, with bias: the log
    decay g = -softplus(wa x)), ``wb`` (d -> heads: beta = sigmoid(wb x)), ``wg`` (d -> heads x
    head_dim: the output gate) and ``wo`` back to d; the output is RMS-normalised per head (no
    weight: the gate scales it) and gated by silu(wg x). Names match ``Attention`` where the role
    does, so tensor parallel and per-loop LoRA address both alike.

    σReparam (``sigma_reparam``, ``models.sigma_reparam``): the projections ``SIGMA_REPARAM``
    (wq, wk, wv, wg, wo; the block's MLP is reparameterised by ``Block``) compute with
    ``gamma / sigma(W) * W``, like an attention layer's q, k, v, o (q and k are L2-normalised in
    the core, so their gains matter only against a per-loop LoRA delta added to their output; the
    spectral norms of v, the gate and o bound the size of what the layer writes). ``wa`` and
    ``wb`` stay plain. σReparam bounds the spectral norm of the products whose growth sharpens
    attention-like scores without limit; ``wa x`` and ``wb x`` reach the recurrence only through
    squashing functions -- the decay ``alpha = exp(-softplus(wa x + b))`` in (0, 1] and the write
    strength ``beta = sigmoid(wb x)`` in (0, 1) -- so however large their spectral norms grow,
    the state's weights on past tokens stay products of factors in [0, 1] (a large norm saturates a
    gate, it does not inflate a logit), and there is nothing for the method to bound. Leaving them
    plain also leaves ``wa``'s bias, which alone sets the decay time constants at initialisation
    (``reset_decay``), a plain bias next to a plain weight (``SigmaReparamLinear`` has no bias).
    """

    SIGMA_REPARAM = ("wq", "wk", "wv", "wg", "wo")  # the linears σReparam applies to (see above)

    def __init__(self, dim: int, n_heads: int, kernel: str = "auto", sigma_reparam: bool = False):
        super().__init__()
        self.head_dim = dim // n_heads
        inner = n_heads * self.head_dim
        self.wq = nn.Linear(dim, inner, bias=False)
        self.wk = nn.Linear(dim, inner, bias=False)
        self.wv = nn.Linear(dim, inner, bias=False)
        self.wa = nn.Linear(dim, n_heads, bias=True)
        self.wb = nn.Linear(dim, n_heads, bias=False)
        self.wg = nn.Linear(dim, inner, bias=False)
        self.wo = nn.Linear(inner, dim, bias=False)
        self.core = GatedDeltaCore(kernel)
        if sigma_reparam:  # same weight parameters, same names and registration order (so same init)
            for name in self.SIGMA_REPARAM:
                setattr(self, name, SigmaReparamLinear(getattr(self, name).weight))

    @torch.no_grad()
    def reset_decay(self) -> None:
        """Decay biases spread over heads so that at init the state's time constant 1/(1-alpha)
        runs log-uniformly from 4 to 1024 tokens across heads (the role of GDN's A_log/dt_bias,
        folded into one bias so the layer has only linear weights to shard)."""
        n = self.wa.bias.numel()
        tau = torch.logspace(math.log10(4.0), math.log10(1024.0), n, dtype=torch.float64)
        neg_log_alpha = -torch.log1p(-1.0 / tau)  # softplus(bias) = -log(alpha)
        self.wa.bias.copy_(torch.log(torch.expm1(neg_log_alpha)).to(self.wa.bias.dtype))

    def forward(self, x, cos=None, sin=None, doc_ids=None):
        shape = (*x.shape[:2], -1, self.head_dim)  # head count from the projection: tp-local heads
        q, k, v = self.wq(x).view(shape), self.wk(x).view(shape), self.wv(x).view(shape)
        g = -F.softplus(self.wa(x).to(torch.promote_types(x.dtype, torch.float32)))  # at least float32
        beta = torch.sigmoid(self.wb(x))
        out = self.core(q, k, v, g, beta, doc_ids)
        out = F.rms_norm(out, (self.head_dim,)) * F.silu(self.wg(x).view(shape))
        return self.wo(out.reshape(*out.shape[:2], -1))
