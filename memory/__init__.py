"""Memory policies: recomputation, activation offload, tiling, optimizer offload, the planner.

Modules, one idea each:
- ``recompute``: none / full / selective checkpointing per block and layer group; per loop
  iteration for a looped model's core.
- ``selective``: which op outputs selective recomputation keeps (attention; matmuls on request)
  and the store they wait in (the GPU, or the offloader's host pool).
- ``offload``: saved activations (what recompute keeps) to a bounded host pool on a side
  stream, prefetched back in backward; token-wise split.
- ``tiling``: MLP and head + cross-entropy over sequence chunks, recomputed in backward.
- ``optimizer_offload``: ``build_optimizer`` (AdamW, or Adam state + fp32 master on the CPU)
  and ``fsdp_offload_policy`` for FSDP2.
- ``step_time``: the step-time model (FLOPs at measured kernel rates, communication inside and
  across nodes, exposed offload copies, the pipeline bubble) and the measured steps it is checked
  against.
- ``cluster``: layouts for N nodes x G GPUs (``longtrain plan --nodes``), each at the planner's
  fastest fitting policy, ranked by tokens per second per GPU.
- ``activations``: what one block keeps for backward, per token, by tensor, under each recompute
  mode.
- ``step_memory``: a policy (``Policy``) and the per-rank memory of one step under it, term by
  term at each moment of the step (``estimate``, with ``step_time``'s seconds beside it).
- ``planner``: the policies weighed and the choice of the fastest that fits, ``resolve_policy``
  for ``memory.policy=auto``, ``measure_peak``; ``plan_table`` prints its rows; ``cli`` registers
  ``longtrain plan``.

``apply_activation_memory(model, cfg)`` is the one entry point ``parallel.parallelize`` calls,
after tensor parallelism and Ulysses and before compile and FSDP2. It only replaces
``forward`` of submodules the model lists (``model.blocks()`` and each block's ``feed_forward``,
``model.loop_body()``, ``model.loss_head()``: ``longtrain.models.units``), so it works on a
pipeline stage that holds a subset of them and on modules whose weights are DTensors or whose
attention is wrapped.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from longtrain.config import ConfigError
from longtrain.memory.offload import offload_layer_inputs
from longtrain.memory.recompute import apply_recompute
from longtrain.memory.tiling import apply_tiling
from longtrain.models.attention import selective_recompute_supported


def apply_activation_memory(model: nn.Module, cfg) -> dict:
    """Apply ``cfg.memory`` (``cfg`` is a full ``Config``) to ``model`` in place.

    Order: tiling inside the blocks first, then the block / core wrappers (recompute, with
    offload around each checkpointed call). Returns a summary {what: how} for the start-up log;
    the offloader, when any, is stored as ``model._longtrain_offloader`` for its statistics.
    """
    mem = cfg.memory
    if mem.policy == "auto":
        raise ConfigError("memory.policy=auto must be resolved before apply_activation_memory; call "
                          "longtrain.memory.planner.resolve_policy(cfg, dims) first (the trainer does).")
    summary = apply_tiling(model, mem)
    offloader = None
    if mem.offload:
        device = next((p.device for p in model.parameters()), None)
        offloader = offload_layer_inputs(mem, device)
        model._longtrain_offloader = offloader
    modes = apply_recompute(model, mem, offloader.wrap if offloader is not None else None, store=offloader)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if "selective" in modes.values() and not selective_recompute_supported(cfg.model.attn_backend, device.type,
                                                                           cfg.data.doc_masking):
        raise ConfigError("memory.recompute=selective cannot run around FlexAttention (document masks on a GPU: "
                          "compiled flex cannot be traced inside selective recompute); use memory.recompute=full, "
                          "data.doc_masking=false, or memory.policy=auto (which then leaves selective out).")
    summary["recompute"] = _summarise(modes)
    if offloader is not None:
        summary["offload"] = f"fraction={mem.offload_fraction} host_budget_gb={mem.host_budget_gb:g}"
    return summary


def _summarise(modes: dict) -> str:
    counts: dict = {}
    for m in modes.values():
        counts[m] = counts.get(m, 0) + 1
    return ", ".join(f"{m}x{n}" for m, n in counts.items()) or "no blocks"


__all__ = ["apply_activation_memory"]
