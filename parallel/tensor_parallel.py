"""Tensor parallelism (Megatron-style, with sequence parallelism) through DTensor plans.

Owns: the ``parallelize_module`` plans for a ``Block``, the embedding, the LM head, a model's
token-wise projections (the looped re-injection) and its per-loop LoRA, i.e.
``apply_tensor_parallel(model, dims)``. Which modules those are the model says
(``longtrain.models.units``: its embedding and head units, ``blocks()``, ``token_wise_modules()``,
``lora_points()``).

Layout over the ``tp`` mesh dimension, per block (torchtitan's plan):

- the residual stream between blocks is sharded along the sequence (``Shard(1)``), so
  activations, norms and residual adds are not replicated over tp;
- ``attention_norm`` / ``ffn_norm`` (and Peri-LN's output norms) run on that sequence shard
  (``SequenceParallel``); QK-norm's per-head norms run on each rank's heads, weight replicated;
- entering attention / MLP, the normed input is all-gathered along the sequence
  (``PrepareModuleInput``); ``wq, wk, wv, w1, w3`` are column-parallel (each rank computes its
  heads / its slice of the hidden width), ``wo, w2`` are row-parallel and reduce-scatter their
  partial sums straight back into the sequence shard. A σReparam linear (``model.sigma_reparam``)
  is split the same way, its gain ``gamma`` and singular-vector estimates ``u``, ``v`` replicated
  (``ColumnParallel``).

Heads therefore split across tp before Ulysses splits them further across sp: each rank attends
over n_heads / (tp * sp) heads. The embedding is row-parallel over the vocabulary (its partial
sums are reduce-scattered into the sequence shard); the output head is column-parallel over the
vocabulary with the logits all-gathered, so the cross-entropy is the plain, exact one (every tp
rank computes the same loss sum; the trainer reduces losses over dp and sp only).

Gated delta rule layers (``BlockRef.mixer == "gdn"``) split like attention, by head: q, k, v, the
per-head decay and beta projections and the output gate column-parallel, ``wo`` row-parallel; the
recurrence is per head, so it runs on the local heads untouched. Under σReparam its q, k, v, gate
and output projections keep ``gamma``, ``u``, ``v`` replicated like attention's (``ColumnParallel``
for every column split, so no one-element gain is cut); the decay and beta gates stay plain
linears, the decay's bias split by head with its weight.

Looped model: the shared core blocks get the same block plan (they are ordinary ``Block``s called
R times; ``model.blocks()`` lists them with the others). Its per-loop LoRA (``x A_i^T B_i^T`` added
to a linear's output by a forward hook; ``model.lora_points()`` names each one's linear) is sharded
like the linear it modifies, on the side ``block_plan`` splits it: for a column-parallel linear,
B is split along its output rows and A replicated; for a row-parallel one, A is split along its input columns and B
replicated -- the hook then sees DTensors and adds a delta of the same layout as the linear's own
output. The ``concat`` re-injection projection acts token-wise on the sequence shard with its
weight replicated (``SequenceParallel``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from longtrain.models.units import EMBEDDING, HEAD, DescribedModel


class ColumnParallel(ColwiseParallel):
    """``ColwiseParallel`` that splits only a linear's ``weight`` (and ``bias``) along the output
    rows. The library's splits every parameter of the linear along dim 0, which would cut a
    σReparam layer's one-element ``gamma`` (``models.sigma_reparam``: a gain of the whole weight,
    not one per row) into one element and none. Left alone, ``gamma`` is replicated by
    ``distribute_module``, as are the layer's ``u``, ``v`` buffers (``RowwiseParallel`` already
    splits ``weight`` alone)."""

    def _partition_linear_fn(self, name, module, device_mesh):
        for pname in ("weight", "bias"):
            param = getattr(module, pname, None)
            if param is not None:
                module.register_parameter(pname, nn.Parameter(
                    distribute_tensor(param, device_mesh, [Shard(0)], src_data_rank=self.src_data_rank),
                    requires_grad=param.requires_grad))


def block_plan(m=None, mixer: str = "full") -> dict:
    """The plan for one ``Block`` of a model with config ``m`` (its stability options add norms);
    inputs (x, cos, sin, doc_ids) -- only x is distributed. A ``gdn`` block's mixer also splits its
    decay, beta and output-gate projections by head."""
    gdn = {f"attention.{name}": ColumnParallel() for name in ("wa", "wb", "wg")} if mixer == "gdn" else {}
    plan = gdn | {
        "attention_norm": SequenceParallel(),
        "attention": PrepareModuleInput(
            input_layouts=(Shard(1), None, None, None),
            desired_input_layouts=(Replicate(), None, None, None),
        ),
        "attention.wq": ColumnParallel(),
        "attention.wk": ColumnParallel(),
        "attention.wv": ColumnParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
        "feed_forward": PrepareModuleInput(
            input_layouts=(Shard(1),),
            desired_input_layouts=(Replicate(),),
        ),
        "feed_forward.w1": ColumnParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        "feed_forward.w3": ColumnParallel(),
    }
    if m is not None and m.norm_placement == "peri":
        # the output norms act on the sublayer's result, already reduce-scattered into the
        # sequence shard, and hand a plain tensor back to the (plain) residual add
        plan["attention_out_norm"] = SequenceParallel(use_local_output=True)
        plan["ffn_out_norm"] = SequenceParallel(use_local_output=True)
    if m is not None and m.qk_norm and mixer != "gdn":  # a gdn mixer has no QK-norm (its core L2-normalises)
        # q, k: [B, S, local heads, head_dim] -- sharded over tp along the heads (dim 2); the
        # head_dim weight is replicated and its gradient summed over the heads of every rank
        plan["attention.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        plan["attention.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
    return plan


def head_plan() -> dict:
    """The plan for an ``LMHead``: its norm on the sequence shard, the output projection
    column-parallel over the vocabulary with the logits gathered."""
    return {"norm": SequenceParallel(),
            "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())}


def _shard_lora(model: DescribedModel, tp_mesh) -> None:
    """Distribute each low-rank delta the model lists consistently with the linear it modifies:
    the side ``block_plan`` splits that linear on."""
    plan = block_plan(model.cfg)
    for point in model.lora_points():
        style = plan.get(point.block_path)
        if not isinstance(style, (ColwiseParallel, RowwiseParallel)):
            raise NotImplementedError(
                f"tensor parallel: LoRA {point.name} modifies {point.block}.{point.block_path}, which "
                f"block_plan() in parallel/tensor_parallel.py does not split column- or row-wise; add it there.")
        # A: [loops, rank, in], B: [loops, out, rank]
        a_place, b_place = ((Replicate(), Shard(1)) if isinstance(style, ColwiseParallel) else (Shard(2), Replicate()))
        mod = point.module
        mod.A = nn.Parameter(distribute_tensor(mod.A.data, tp_mesh, [a_place]))
        mod.B = nn.Parameter(distribute_tensor(mod.B.data, tp_mesh, [b_place]))


def apply_tensor_parallel(model: DescribedModel, dims) -> DescribedModel:
    """Shard ``model`` (``Llama`` or ``Looped``) over the ``tp`` mesh dimension, in place."""
    if dims.tp == 1:
        return model
    tp_mesh = dims.get_mesh("tp")
    # the top level: embedding in, head out; the residual stream in between is Shard(1)
    ends = {u.kind: u for u in model.units() if u.kind in (EMBEDDING, HEAD)}
    emb = model.held_module(ends[EMBEDDING].modules[0])  # None on a pipeline stage without it
    head = model.held_module(ends[HEAD].modules[0])
    # embedding in, head out; the residual stream in between is Shard(1)
    if emb is not None:
        parallelize_module(emb, tp_mesh, RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)))
    if head is not None:
        parallelize_module(head, tp_mesh, head_plan())
    if model.cfg.tie_embeddings and emb is not None and head is not None:
        # both plans shard the [vocab, dim] weight along the vocabulary (Shard(0)), but each
        # distributes its own copy; point the head back at the embedding's DTensor so the tie (one
        # parameter, gradients of both uses summed into it) survives. (A pipeline stage holding only
        # one of the two keeps its own copy; the pipeline sums the copies' gradients across stages.)
        assert emb.weight.placements == head.output.weight.placements, (emb.weight.placements,)
        head.output.weight = emb.weight
    for _, module in model.token_wise_modules():
        # e.g. the looped re-injection projection of [state, prelude output]: on the sequence
        # shard, with its weight replicated
        parallelize_module(module, tp_mesh, SequenceParallel(use_local_output=True))
    for ref in model.blocks():
        parallelize_module(ref.module, tp_mesh, block_plan(model.cfg, ref.mixer))
    _shard_lora(model, tp_mesh)
    return model


def align_grad_placements(model: nn.Module) -> None:
    """Without FSDP, give every DTensor parameter's gradient the parameter's own placements.

    A replicated weight used on a sequence shard (norms, the re-injection projection, one side of
    a LoRA) gets a gradient pending a sum over tp (``Partial``); DTensor's embedding backward
    returns the vocab-sharded embedding's gradient replicated. FSDP resolves both itself when it
    reduces gradients; with tensor parallel alone this hook does it once the gradient is ready, so
    optimizers, the norm and the pipeline's sum of a tied weight's copies (whose local tensors
    must have one layout on every stage) see the gradient laid out like the weight.
    """
    def hook(p):
        g = p.grad
        if isinstance(g, DTensor) and g.placements != p.placements:
            p.grad = g.redistribute(g.device_mesh, p.placements)

    for p in model.parameters():
        if isinstance(p, DTensor) and p.requires_grad:
            p.register_post_accumulate_grad_hook(hook)
