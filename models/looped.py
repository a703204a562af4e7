"""The looped (recurrent-depth) transformer: prelude -> one core block applied R times -> coda.

Owns: ``LoopedCore`` (the k shared layers run once per call, with that iteration's LoRA
deltas), ``LoopLoRA`` (per-iteration low-rank deltas, zero-initialised, attached to the core's
projections by forward hooks so the blocks stay plain), ``Looped`` (the whole model, with
prelude-output re-injection, sampled loop counts and truncated backprop through loops) and
``sample_loops`` (the per-step loop count every rank must agree on). ``Looped`` describes its
units (``models.units``), one of them per core iteration, and runs any contiguous run of them.

Iteration i (0-based) of the core reads the state left by iteration i-1; from the second
iteration on, the prelude output ``e`` is re-injected (``add``: s + e; ``concat``: a learned
projection of [s, e]). With R=1 the model is therefore exactly the plain stack
prelude + core + coda. Truncated backprop runs the first R-B iterations without building a
graph, so the shared weights get gradient only from the last B (``Unit.builds_graph``).

Variants of the loop (issue 24): ``model.core_attention`` makes chosen core layers gated delta
rule layers (``models.linear_attention``: linear in the sequence length) instead of softmax
attention; ``model.hyper_streams = n > 1`` carries n residual streams between iterations, mixed
after each (``models.hyper``); ``model.loop_schedule`` raises the training loop count as training
goes on (``loops_at``, a function of the step alone, so a resumed run continues the schedule
exactly). Between units the hyper-connected state is the n streams side by side, ``[B, S, n*d]``;
the first unit after the loop reduces them to one.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from longtrain.models.costs import core_mixers
from longtrain.models.hyper import EXPAND, READ, REDUCE, WRITE, HyperStreams
from longtrain.models.linear_attention import GatedDeltaNet
from longtrain.models.llama import Block, LMHead, init_block_, positions_for
from longtrain.models.rope import Rotary
from longtrain.models.units import (BLOCK, EMBEDDING, HEAD, LOOP, BlockRef, DescribedModel, LoRAPoint, ShardUnit,
                                    Unit)

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


def core_block(cfg, mixer: str) -> Block:
    """A core layer: a ``Block`` whose ``attention`` is a gated delta rule layer for ``gdn``.

    The stability options apply to a gdn layer as far as they mean something there: Peri-LN's
    output norms belong to the ``Block`` and wrap the mixer like attention; ``model.qk_norm`` adds
    nothing, since the gated delta rule already L2-normalises q and k per head inside its core.
    """
    block = Block(cfg)
    if mixer == "gdn":
        block.attention = GatedDeltaNet(cfg.dim, cfg.n_heads, cfg.gdn_kernel, cfg.sigma_reparam)
    return block


class LoopedCore(nn.Module):
    """The shared block of ``n_core`` layers; ``forward(x, i, ...)`` runs iteration ``i``."""

    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleDict({str(j): core_block(cfg, mixer) for j, mixer in enumerate(core_mixers(cfg))})
        # model.loop_norm: the state leaving each iteration is normalised, so R iterations cannot grow it R-fold
        self.out_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps) if cfg.loop_norm else None
        self.lora = nn.ModuleDict()
        self.loop_index = 0
        self._lora_keys: dict[str, tuple[str, str]] = {}  # lora key -> (layer key, linear's path in the block)
        if cfg.lora_rank > 0:
            for j, layer in self.layers.items():
                for target in LORA_TARGETS:
                    lin = layer.get_submodule(target)
                    key = f"{j}_{target.replace('.', '_')}"
                    self.lora[key] = LoopLoRA(lin.in_features, lin.out_features, cfg.loops_max,
                                              cfg.lora_rank, cfg.lora_alpha)
                    self._lora_keys[key] = (j, target)
                    lin.register_forward_hook(_LoRAHook(self, key))

    def lora_targets(self) -> dict[str, tuple[str, str, LoopLoRA]]:
        """{lora key: (layer key, path of the linear in that block, the ``LoopLoRA``)}."""
        return {key: (*self._lora_keys[key], mod) for key, mod in self.lora.items()}

    def forward(self, x, i: int, cos, sin, doc_ids=None):
        self.loop_index = i
        for layer in self.layers.values():
            x = layer(x, cos, sin, doc_ids)
        return x if self.out_norm is None else self.out_norm(x)


def loops_at(cfg, step: int) -> int:
    """The training loop count at ``step``: the last ``model.loop_schedule`` entry at or before
    it, or ``model.loops`` without a schedule (the count evaluation always uses)."""
    count = cfg.loops
    for start, n in cfg.loop_schedule:
        if step >= start:
            count = n
    return count


def planned_loops(cfg) -> int:
    """The most iterations a training step can run: what memory must be planned for."""
    if cfg.loop_sampling != "fixed":
        return cfg.loops_max
    return max([cfg.loops] * (not cfg.loop_schedule) + [n for _, n in cfg.loop_schedule])


def sample_loops(cfg, step: int, seed: int, training: bool) -> int:
    """Loop count for one step: the same on every rank (a function of seed and step only).

    With ``model.loop_schedule`` the scheduled count ``loops_at(step)`` takes the place of
    ``model.loops``: ``fixed`` runs it, ``poisson`` draws around it (``uniform`` is refused by the
    config: its range is tied to ``loops_max``, not to the scheduled count)."""
    if not training:
        return cfg.loops
    mean = loops_at(cfg, step)
    if cfg.loop_sampling == "fixed":
        return mean
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    if cfg.loop_sampling == "uniform":
        lo = max(1, 2 * mean - cfg.loops_max)
        r = int(torch.randint(lo, cfg.loops_max + 1, (1,), generator=g))
    else:  # poisson around the mean, at least 1
        r = int(torch.poisson(torch.tensor([float(mean)]), generator=g)) or 1
    return max(1, min(r, cfg.loops_max))


class Looped(DescribedModel):
    """Embedding, prelude blocks, the core run R times, coda blocks, head.

    Its units: ``tok_embeddings``, ``prelude.<i>``, ``core@<r>`` (iteration r, all core blocks
    with that iteration's LoRA), ``coda.<i>``, ``head``. Global block indices run over prelude,
    core, coda. FSDP units: each prelude and coda block, and the core as ONE unit kept gathered
    for its R calls. Between units the activation is the hidden state ``h``, or -- from the end of
    the prelude while a later iteration still re-injects -- ``[h, e]`` concatenated on the last
    dimension (one tensor, so a pipeline stage sends one activation).
    """

    shared_modules = ("rotary",)

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.prelude = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_prelude)})
        self.core = LoopedCore(cfg)
        self.coda = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_coda)})
        self.inject = nn.Linear(2 * cfg.dim, cfg.dim, bias=False) if cfg.reinject == "concat" else None
        self.hyper = HyperStreams(cfg.dim, cfg.hyper_streams, cfg.loops_max) if cfg.hyper_streams > 1 else None
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
            if isinstance(block.attention, GatedDeltaNet):
                block.attention.reset_decay()
        if self.hyper is not None:
            self.hyper.reset_parameters()
        for lora in self.core.lora.values():
            lora.reset_parameters()
        if self.core.out_norm is not None:
            nn.init.ones_(self.core.out_norm.weight)
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

    # ---------------------------------------------------------------- description (models.units)

    @classmethod
    def units_for(cls, cfg, n_loops: int | None = None) -> list[Unit]:
        """``n_loops`` iterations (default ``cfg.loops``); with ``cfg.backprop_loops`` = B, the
        first ``n_loops - B`` build no graph (truncated backprop through loops)."""
        n_loops = cfg.loops if n_loops is None else n_loops
        no_graph = n_loops - (cfg.backprop_loops or n_loops)
        inject = ("inject",) if cfg.reinject == "concat" else ()
        hyper = ("hyper",) if cfg.hyper_streams > 1 else ()  # the loop units and the one reducing after them
        after = [Unit(f"coda.{i}", BLOCK, (f"coda.{i}",) + (hyper if i == 0 else ()), index=i)
                 for i in range(cfg.n_coda)]
        return ([Unit("tok_embeddings", EMBEDDING, ("tok_embeddings",))]
                + [Unit(f"prelude.{i}", BLOCK, (f"prelude.{i}",), index=i) for i in range(cfg.n_prelude)]
                + [Unit(f"core@{r}", LOOP, ("core",) + (inject if r >= 1 else ()) + hyper, index=r,
                        builds_graph=r >= no_graph) for r in range(n_loops)]
                + after + [Unit("head", HEAD, ("head",) + (() if after else hyper))])

    def blocks(self) -> list[BlockRef]:
        n_pre, n_core = self.cfg.n_prelude, self.cfg.n_core
        out = [BlockRef(int(i), f"prelude.{i}", b) for i, b in self.prelude.items()]
        if self.core is not None:
            mixers = core_mixers(self.cfg)
            out += [BlockRef(n_pre + int(j), f"core.layers.{j}", b, in_loop=True, mixer=mixers[int(j)])
                    for j, b in self.core.layers.items()]
        return out + [BlockRef(n_pre + n_core + int(i), f"coda.{i}", b) for i, b in self.coda.items()]

    def shard_units(self) -> list[ShardUnit]:
        pre = [ShardUnit(f"prelude.{i}", b) for i, b in self.prelude.items()]
        core = [ShardUnit("core", self.core, reshard_after_forward=False)] if self.core is not None else []
        return pre + core + [ShardUnit(f"coda.{i}", b) for i, b in self.coda.items()]

    def lora_points(self) -> list[LoRAPoint]:
        if self.core is None:
            return []
        return [LoRAPoint(f"core.lora.{key}", mod, f"core.layers.{j}", target)
                for key, (j, target, mod) in self.core.lora_targets().items()]

    def loop_body(self) -> nn.Module | None:
        return self.core

    def snapshot_loop_index(self):
        core = self.core
        i = core.loop_index

        def restore():
            core.loop_index = i

        return restore

    def loss_head(self) -> nn.Module | None:
        return self.head

    def token_wise_modules(self) -> list[tuple[str, nn.Module]]:
        out = [(name, mod) for name, mod in (("inject", self.inject), ("hyper", self.hyper)) if mod is not None]
        if self.core is not None and self.core.out_norm is not None:
            out.append(("core.out_norm", self.core.out_norm))
        return out

    def on_loop_output(self, fn):
        if self.core is None:
            return []
        return [self.core.register_forward_hook(lambda mod, args, out: fn(args[1], out))]

    def _carries_e(self, u: Unit) -> bool:
        """Whether the activation after ``u`` is ``[h, e]``: from the end of the prelude (the
        embedding when there is none) until the last iteration that re-injects e."""
        m = self.cfg
        if m.reinject == "none":
            return False
        if u.kind == LOOP:
            return u.index < m.loops - 1
        return u.name == self._prelude_end() and m.loops >= 2

    def _prelude_end(self) -> str:
        """The unit whose output is the prelude output e (the embedding when there is no prelude)."""
        return f"prelude.{self.cfg.n_prelude - 1}" if self.cfg.n_prelude else "tok_embeddings"

    def forward_units(self, units, x, position_ids=None, doc_ids=None, labels=None):
        """Run ``units`` (a contiguous run of ``units()``) on ``x``: the tokens if the run starts
        with the embedding, else the activation the unit before it returned (see the class doc).
        Returns that activation, or after the head the logits (the summed loss with ``labels``)."""
        position_ids = positions_for(units, x, position_ids)
        cos, sin = self.rotary(position_ids)
        h, e, wide = x, None, False  # wide: h holds the hyper-connected streams [.., n*d]
        if units[0].kind != EMBEDDING:
            every = self.units()
            before = every[[u.name for u in every].index(units[0].name) - 1]
            wide = self.cfg.hyper_streams > 1 and before.kind == LOOP
            if self._carries_e(before):
                h, e = x.split([x.shape[-1] - self.cfg.dim, self.cfg.dim], dim=-1)
        for u in units:
            if wide and u.kind != LOOP:  # the first unit after the loop takes one stream in
                h, wide = self.hyper(h, op=REDUCE), False
            if u.kind == EMBEDDING:
                h = self.tok_embeddings(h)
            elif u.kind == BLOCK:
                h = self.get_submodule(u.modules[0])(h, cos, sin, doc_ids)
            elif u.kind == LOOP:
                with torch.set_grad_enabled(torch.is_grad_enabled() and u.builds_graph):
                    if self.hyper is None:
                        h = self.core(self.reinject(h, e, u.index), u.index, cos, sin, doc_ids)
                    else:
                        h, wide = self._hyper_iteration(h if wide else self.hyper(h, op=EXPAND), e, u.index,
                                                        cos, sin, doc_ids), True
            else:
                return self.head(h, labels)
            if u.name == self._prelude_end():
                e = h
        return torch.cat([h, e], dim=-1) if self._carries_e(units[-1]) else h

    def _hyper_iteration(self, streams, e, i: int, cos, sin, doc_ids):
        """One iteration on the streams: read the core's input, write back what it added."""
        x = self.hyper(streams, op=READ, i=i)
        delta = self.core(self.reinject(x, e, i), i, cos, sin, doc_ids) - x
        return self.hyper(torch.cat([streams, delta], dim=-1), op=WRITE, i=i)

    def forward(self, tokens, position_ids=None, doc_ids=None, labels=None, n_loops: int | None = None):
        """The whole model with ``n_loops`` iterations (default ``model.loops``), or, once
        ``prune_to`` cut it to a run, that run (see ``forward_units``)."""
        if n_loops is not None and not 1 <= n_loops <= self.cfg.loops_max:
            raise ValueError(f"n_loops={n_loops} must be in [1, model.loops_max={self.cfg.loops_max}].")
        return self.forward_units(self.units_to_run(n_loops), tokens, position_ids, doc_ids, labels)
