"""The looped (recurrent-depth) transformer: prelude -> one core block applied R times -> coda.

Owns: ``LoopedCore`` (the k shared layers run once per call, with that iteration's LoRA
deltas), ``LoopLoRA`` (per-iteration low-rank deltas, zero-initialised, attached to the core's
projections by forward hooks so the blocks stay plain), ``Looped`` (the whole model, with
prelude-output re-injection, sampled loop counts and truncated backprop through loops) and
``sample_loops`` (the per-step loop count every rank must agree on).

Iteration i (0-based) of the core reads the state left by iteration i-1; from the second
iteration on, the prelude output ``e`` is re-injected (``add``: s + e; ``concat``: a learned
projection of [s, e]). With R=1 the model is therefore exactly the plain stack
prelude + core + coda. Truncated backprop runs the first R-B iterations without building a
graph, so the shared weights get gradient only from the last B.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from longtrain.models.llama import Block, LMHead, default_positions, init_block_
from longtrain.models.rope import Rotary

LORA_TARGETS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


class LoopLoRA(nn.Module):
    """Low-rank deltas for one linear layer, one pair (A_i, B_i) per loop iteration."""

    def __init__(self, in_features: int, out_features: int, n_loops: int, rank: int, alpha: float):
        super().__init__()
        self.A = nn.Parameter(torch.empty(n_loops, rank, in_features))
        self.B = nn.Parameter(torch.zeros(n_loops, out_features, rank))
        self.scale = alpha / rank
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.A, std=1.0 / math.sqrt(self.A.shape[-1]))
        nn.init.zeros_(self.B)  # every delta starts at exactly zero

    def delta(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return (x @ self.A[i].t().to(x.dtype)) @ self.B[i].t().to(x.dtype) * self.scale


class _LoRAHook:
    """Adds iteration ``core.loop_index``'s delta to a core linear layer's output. An object, not a
    closure, so ``copy.deepcopy`` of the model re-points it at the copied core."""

    def __init__(self, core: "LoopedCore", key: str):
        self.core, self.key = core, key

    def __call__(self, module, args, output):
        return output + self.core.lora[self.key].delta(args[0], self.core.loop_index)


class LoopedCore(nn.Module):
    """The shared block of ``n_core`` layers; ``forward(x, i, ...)`` runs iteration ``i``."""

    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleDict({str(j): Block(cfg) for j in range(cfg.n_core)})
        self.lora = nn.ModuleDict()
        self.loop_index = 0
        if cfg.lora_rank > 0:
            for j, layer in self.layers.items():
                for target in LORA_TARGETS:
                    lin = layer.get_submodule(target)
                    key = f"{j}_{target.replace('.', '_')}"
                    self.lora[key] = LoopLoRA(lin.in_features, lin.out_features, cfg.loops_max,
                                              cfg.lora_rank, cfg.lora_alpha)
                    lin.register_forward_hook(_LoRAHook(self, key))

    def forward(self, x, i: int, cos, sin, doc_ids=None):
        self.loop_index = i
        for layer in self.layers.values():
            x = layer(x, cos, sin, doc_ids)
        return x


def sample_loops(cfg, step: int, seed: int, training: bool) -> int:
    """Loop count for one step: the same on every rank (a function of seed and step only)."""
    if not training or cfg.loop_sampling == "fixed":
        return cfg.loops
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    if cfg.loop_sampling == "uniform":
        lo = max(1, 2 * cfg.loops - cfg.loops_max)
        r = int(torch.randint(lo, cfg.loops_max + 1, (1,), generator=g))
    else:  # poisson around the mean, at least 1
        r = int(torch.poisson(torch.tensor([float(cfg.loops)]), generator=g)) or 1
    return max(1, min(r, cfg.loops_max))


class Looped(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.prelude = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_prelude)})
        self.core = LoopedCore(cfg)
        self.coda = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_coda)})
        self.inject = nn.Linear(2 * cfg.dim, cfg.dim, bias=False) if cfg.reinject == "concat" else None
        self.head = LMHead(cfg.dim, cfg.vocab_size, cfg.norm_eps)
        if cfg.tie_embeddings:
            self.head.output.weight = self.tok_embeddings.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        std = self.cfg.init_std
        depth = (2 * self.cfg.n_unrolled_layers) ** 0.5
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        for block in [*self.prelude.values(), *self.core.layers.values(), *self.coda.values()]:
            init_block_(block, std, depth)
        for lora in self.core.lora.values():
            lora.reset_parameters()
        if self.inject is not None:
            # start as "state + 0 * e": identity on the state half, zero on the prelude half
            self.inject.weight.zero_()
            self.inject.weight[:, : self.cfg.dim].copy_(torch.eye(self.cfg.dim))
        nn.init.ones_(self.head.norm.weight)
        if not self.cfg.tie_embeddings:
            nn.init.trunc_normal_(self.head.output.weight, std=self.cfg.dim ** -0.5)
        self.rotary.reset_parameters()

    def reinject(self, s: torch.Tensor, e: torch.Tensor, i: int) -> torch.Tensor:
        """The core's input at iteration i: the state, plus the prelude output from i >= 1."""
        if i == 0 or self.cfg.reinject == "none":
            return s
        if self.cfg.reinject == "add":
            return s + e
        return self.inject(torch.cat([s, e], dim=-1))

    def run_loops(self, e, n_loops: int, cos, sin, doc_ids=None, start: int = 0, s=None):
        """Iterations [start, n_loops) of the core; the first ``n_loops - B`` build no graph."""
        B = self.cfg.backprop_loops or n_loops
        s = e if s is None else s
        for i in range(start, n_loops):
            if i < n_loops - B:
                with torch.no_grad():
                    s = self.core(self.reinject(s, e, i), i, cos, sin, doc_ids)
            else:
                s = self.core(self.reinject(s, e, i), i, cos, sin, doc_ids)
        return s

    def forward(self, tokens, position_ids=None, doc_ids=None, labels=None, n_loops: int | None = None):
        n_loops = self.cfg.loops if n_loops is None else n_loops
        if not 1 <= n_loops <= self.cfg.loops_max:
            raise ValueError(f"n_loops={n_loops} must be in [1, model.loops_max={self.cfg.loops_max}].")
        if position_ids is None:
            position_ids = default_positions(tokens)
        h = self.tok_embeddings(tokens)
        cos, sin = self.rotary(position_ids)
        for layer in self.prelude.values():
            h = layer(h, cos, sin, doc_ids)
        h = self.run_loops(h, n_loops, cos, sin, doc_ids)
        for layer in self.coda.values():
            h = layer(h, cos, sin, doc_ids)
        return self.head(h, labels)
