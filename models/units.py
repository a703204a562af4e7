"""How a model describes itself: the units it is made of, as the code outside ``models/`` asks.

Owns: ``Unit`` (one step of the forward pass: the embedding, a transformer block, one iteration
of a looped core, the head), ``BlockRef`` (a transformer block with its global index and name),
``ShardUnit`` (a group of parameters gathered together, with whether it is released after
forward), ``LoRAPoint`` (a low-rank delta and the block linear it modifies) and ``DescribedModel``,
the base every model here derives from, with the methods the rest of longtrain calls:

- ``units()`` / ``units_for(cfg)``: the forward pass as a list of ``Unit`` (from the model, or from
  its config alone, for the planner and the pipeline split that have no built model);
- ``forward_units(units, x, ...)``: run a contiguous run of them (a pipeline stage runs this);
- ``prune_to(units)``: drop every module those units do not use (a pipeline stage's model);
- ``blocks()``, ``shard_units()``, ``lora_points()``, ``loop_body()``, ``snapshot_loop_index()``,
  ``loss_head()``, ``token_wise_modules()``, ``held_module(name)``: what recompute, tiling, FSDP
  and tensor parallelism wrap or shard;
- ``param_counts()``, ``flops_per_token(seq_len, causal)``: the costs (``models.costs``).

The idea (STYLE.md point 10, torchtitan's model args owning their FLOP count): parallelism and
memory policies never spell out a model's attribute names or probe it with ``hasattr``; a new model
family implements these methods and needs no edit outside ``models/``. Methods that return modules
return only those present, so they work on a pipeline stage's pruned model; ``units()`` always
describes the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from longtrain.models import costs

EMBEDDING, BLOCK, LOOP, HEAD = "embedding", "block", "loop", "head"


@dataclass(frozen=True)
class Unit:
    """One step of the forward pass, in order.

    ``kind``: ``embedding`` (tokens in), ``block`` (one transformer block), ``loop`` (one
    iteration of a looped core, ``index`` its iteration), ``head`` (logits or the loss out).
    ``modules``: qualified names of the modules whose parameters it uses. ``builds_graph``: False
    for the iterations truncated backprop runs without a graph.
    """

    name: str
    kind: str
    modules: tuple
    index: int = 0
    builds_graph: bool = True

    @property
    def is_layer(self) -> bool:
        """Between the embedding and the head: what pipeline stages are cut from (the embedding
        stays with the first stage, the head with the last)."""
        return self.kind in (BLOCK, LOOP)


@dataclass(frozen=True)
class BlockRef:
    """A transformer block: its global index (``memory.recompute_layers`` selects by it), its
    qualified name, the module, whether it runs once per loop iteration (inside a looped core,
    whose per-iteration state ``snapshot_loop_index`` saves and restores), and its token mixer:
    ``full`` (softmax attention) or ``gdn`` (a gated delta rule layer, ``models.linear_attention``),
    which decides its tensor-parallel plan."""

    index: int
    name: str
    module: nn.Module
    in_loop: bool = False
    mixer: str = "full"


@dataclass(frozen=True)
class ShardUnit:
    """Parameters gathered together (an FSDP unit). ``reshard_after_forward`` is False for a
    module run several times per forward (a looped core: gathered once for its R calls)."""

    name: str
    module: nn.Module
    reshard_after_forward: bool = True


@dataclass(frozen=True)
class LoRAPoint:
    """A low-rank delta (``A: [loops, rank, in]``, ``B: [loops, out, rank]``) added to the output of
    the linear ``block_path`` (e.g. ``attention.wq``) of the block ``block``."""

    name: str
    module: nn.Module
    block: str
    block_path: str


def unit_cost(m, unit: Unit, seq_len: int) -> float:
    """Forward FLOPs per token of ``unit`` of a model with config ``m`` at sequence length
    ``seq_len``, causal attention (the pipeline split balances stages by it; backward is
    proportional). The head counts its loss as well."""
    attn = costs.attention_flops_per_token(m, seq_len, causal=True)
    if unit.kind == EMBEDDING:
        return 0.0
    if unit.kind == BLOCK:
        return 2.0 * costs.block_matmul_params(m) + attn
    if unit.kind == LOOP:
        return 2.0 * costs.loop_iteration_matmul_params(m, unit.index) + costs.core_mixer_flops_per_token(m, seq_len, True)
    if unit.kind == HEAD:
        return 2.0 * costs.head_matmul_params(m) + costs.loss_flops_per_token(m)
    raise ValueError(f"unit {unit.name!r} has kind {unit.kind!r}; models.units.unit_cost knows "
                     f"{[EMBEDDING, BLOCK, LOOP, HEAD]}")


class DescribedModel(nn.Module):
    """Base of the models: the generic half of the description (see the module docstring).

    A subclass defines ``cfg``, ``units_for``, ``forward_units``, ``blocks`` and ``shard_units``,
    and, when it has them, ``lora_points``, ``loop_body``, ``snapshot_loop_index`` and ``loss_head``.
    """

    # modules every run of units needs (no parameters of their own, e.g. the rotary tables)
    shared_modules: tuple = ()

    def __init__(self):
        super().__init__()
        self._run: tuple | None = None  # the units ``forward`` runs once pruned (prune_to)

    @classmethod
    def units_for(cls, cfg, n_loops: int | None = None) -> list[Unit]:
        raise NotImplementedError(f"{cls.__name__}.units_for")

    def units(self, n_loops: int | None = None) -> list[Unit]:
        """The whole model's forward pass as units (``n_loops``: a looped model's iteration count)."""
        return self.units_for(self.cfg, n_loops)

    def forward_units(self, units, x, position_ids=None, doc_ids=None, labels=None):
        raise NotImplementedError(f"{type(self).__name__}.forward_units")

    def blocks(self) -> list[BlockRef]:
        raise NotImplementedError(f"{type(self).__name__}.blocks")

    def shard_units(self) -> list[ShardUnit]:
        raise NotImplementedError(f"{type(self).__name__}.shard_units")

    def lora_points(self) -> list[LoRAPoint]:
        return []

    def loop_body(self) -> nn.Module | None:
        """The module run once per loop iteration (None: no loop, or not on this pruned model)."""
        return None

    def snapshot_loop_index(self) -> Callable[[], None]:
        """A function restoring the loop iteration the blocks see now (recompute re-runs a block
        of a looped core in backward, after later iterations moved the index on)."""
        return lambda: None

    def loss_head(self) -> nn.Module | None:
        """The module turning the last hidden state into logits, or with labels the summed loss
        (an ``LMHead``: ``logits(h)`` gives the logits alone)."""
        return None

    def set_z_loss(self, coef: float) -> None:
        """Add ``coef * logsumexp(logits)^2`` per token to the training loss (``optim.z_loss``)."""
        head = self.loss_head()
        if head is not None:
            head.z_loss = float(coef)

    def on_loop_output(self, fn: Callable) -> list:
        """Call ``fn(iteration, output)`` after every iteration of a looped core (the monitors'
        per-iteration residual RMS); returns the hook handles ([] for a model without a loop)."""
        return []

    def token_wise_modules(self) -> list[tuple[str, nn.Module]]:
        """(name, module) of the modules outside the blocks, the embedding and the head, each acting
        on every token alone (tensor parallelism runs them on its sequence shard)."""
        return []

    def held_module(self, name: str) -> nn.Module | None:
        """The module ``name`` (a qualified name from a unit's ``modules``), None where ``prune_to``
        removed it."""
        try:
            return self.get_submodule(name)
        except AttributeError:
            return None

    def is_looped(self) -> bool:
        return any(u.kind == LOOP for u in self.units())

    # ---------------------------------------------------------------- costs (models.costs)

    def param_counts(self) -> dict:
        return costs.count_params(self.cfg)

    def flops_per_token(self, seq_len: int, causal: bool) -> float:
        return costs.flops_per_token(self.cfg, seq_len, causal)

    # ---------------------------------------------------------------- pruning

    def prune_to(self, units) -> None:
        """Keep only the modules ``units`` (a contiguous run of ``units()``) use, in place; from
        then on ``forward`` runs exactly that run. Names of what is kept do not change."""
        units = tuple(units)
        names = [u.name for u in self.units()]
        first = names.index(units[0].name)
        if [u.name for u in units] != names[first:first + len(units)]:
            raise ValueError(f"prune_to needs a contiguous run of {type(self).__name__}.units(); got "
                             f"{[u.name for u in units]}")
        keep = {m for u in units for m in u.modules} | set(self.shared_modules)
        _prune(self, "", keep)
        self._run = units

    def units_to_run(self, n_loops: int | None = None) -> list[Unit]:
        """What ``forward`` runs: every unit, or the run this model was pruned to."""
        if self._run is None:
            return self.units(n_loops)
        if n_loops is not None:
            raise ValueError(f"n_loops={n_loops} on a model pruned to {[u.name for u in self._run]}: "
                             f"its loop iterations are fixed.")
        return list(self._run)


def _prune(module: nn.Module, prefix: str, keep: set) -> None:
    """Remove the children of ``module`` that neither are in ``keep`` nor contain something that
    is; containers (``ModuleDict``) stay, emptied, so the model's attributes keep their types."""
    for name, child in list(module.named_children()):
        q = prefix + name
        if q in keep:
            continue
        if isinstance(child, nn.ModuleDict) or any(k.startswith(q + ".") for k in keep):
            _prune(child, q + ".", keep)
        elif isinstance(module, nn.ModuleDict):
            del module[name]
        else:
            setattr(module, name, None)
