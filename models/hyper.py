"""Hyper-connected loop iterations (Hyperloop): the residual stream widened to n streams between
iterations of a looped core, mixed by small learned matrices after each iteration.

Owns ``HyperStreams``, the parameters and the four token-wise operations on the streams. A looped
model with ``model.hyper_streams = n > 1`` runs (``models.looped``):

    H = expand(prelude output)                       n copies, [B, S, n*d]
    for each iteration i:
        x = read(H, i)                               sum_k r_ik H_k: the core's input (before re-injection)
        delta = core_i(reinject(x, e)) - x           what the iteration adds to its input
        H = write([H, delta], i)                     H_j <- sum_k M_ijk H_k + w_ij delta
    h = reduce(H)                                    sum_k o_k H_k, into the coda

Only the loop is hyper-connected: prelude and coda blocks keep their single residual stream, and
the core's own blocks their ordinary residual adds (connections per iteration, as Hyperloop puts
them, rather than per layer as in Zhu et al.'s Hyper-Connections). Per-iteration tables go up to
``model.loops_max``, like the per-loop LoRA. Initialisation (static hyper-connections): M_i = I,
w_i = 1, r_i one-hot on stream i mod n, o = 1/n. Then all streams stay equal to the plain model's
state, so at init the model computes exactly what ``hyper_streams=1`` computes; the one-hot reads
give each stream a different gradient, which separates them as training goes on.

Why not the ``hyper-connections`` package (PyPI): it wraps a branch module per layer and folds the
streams into the batch dimension, while here the "branch" is a whole loop iteration whose
input and output travel between pipeline stages and whose streams must stay on the feature
dimension so tensor parallel's sequence shard (``Shard(1)``) and Ulysses' token split apply to the
widened state unchanged. Its module would also bring einops-built parameters that tensor parallel
would have to be taught to replicate. The operations are four einsums; ``forward`` takes ONE tensor
(streams and delta concatenated) and the rest as keywords (``op=``, ``i=``), so tensor parallel can
run it like any token-wise module (``SequenceParallel`` converts the one positional input to a
sequence-sharded DTensor and drops other positionals; its weights are replicated and their
gradients summed over tp).
"""

from __future__ import annotations

import torch
import torch.nn as nn

EXPAND, READ, WRITE, REDUCE = "expand", "read", "write", "reduce"


class HyperStreams(nn.Module):
    """The mixing weights of ``n`` streams of width ``dim`` for up to ``iterations`` iterations."""

    def __init__(self, dim: int, n: int, iterations: int):
        super().__init__()
        self.dim, self.n = dim, n
        self.read_w = nn.Parameter(torch.empty(iterations, n))
        self.mix = nn.Parameter(torch.empty(iterations, n, n))
        self.write_w = nn.Parameter(torch.empty(iterations, n))
        self.out_w = nn.Parameter(torch.empty(n))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        iters, n = self.read_w.shape
        self.read_w.zero_()
        self.read_w[torch.arange(iters), torch.arange(iters) % n] = 1.0
        self.mix.copy_(torch.eye(n).expand(iters, n, n))
        self.write_w.fill_(1.0)
        self.out_w.fill_(1.0 / n)

    def forward(self, x: torch.Tensor, *, op: str, i: int = 0) -> torch.Tensor:
        """``op`` on ``x`` (last dimension: d for expand, n*d for read and reduce, (n+1)*d for
        write: the streams, then the iteration's delta); ``i`` the iteration."""
        n, d = self.n, self.dim
        if op == EXPAND:
            return x.repeat(*([1] * (x.ndim - 1)), n)
        if op == WRITE:
            H, delta = x[..., : n * d], x[..., n * d:]
            H = H.unflatten(-1, (n, d))
            out = torch.einsum("jk,...kd->...jd", self.mix[i].to(x.dtype), H)
            out = out + self.write_w[i].to(x.dtype)[:, None] * delta.unsqueeze(-2)
            return out.flatten(-2)
        weights = self.read_w[i] if op == READ else self.out_w
        if op not in (READ, REDUCE):
            raise ValueError(f"HyperStreams: unknown op {op!r}; one of {[EXPAND, READ, WRITE, REDUCE]}")
        return torch.einsum("k,...kd->...d", weights.to(x.dtype), x.unflatten(-1, (n, d)))
