"""One optimizer step's worth of forward and backward, and the evaluation loss.

Owns: the loss convention every layout shares -- each rank sums token losses over its own
tokens, the sum is divided by the number of real (non-ignored) tokens in the *global* batch
(all data-parallel and sequence-parallel ranks, all accumulation micro-steps), and gradients are
summed over ranks -- so every layout computes exactly the gradient of the global mean loss.
When the pipeline is on, its schedule replaces the plain forward/backward here; the loop in
``train.py`` does not change.
"""

from __future__ import annotations

import contextlib

import torch

from longtrain.models.llama import IGNORE_INDEX
from longtrain.models.sigma_reparam import begin_train_step
from longtrain.parallel.reduce import all_reduce_sum


def _autocast(cfg, device: torch.device):
    dtype = cfg.schedule.dtype
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" else "fp32"
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_kwargs(batch: dict, device: torch.device) -> dict:
    out = {"tokens": batch["tokens"].to(device, non_blocking=True),
           "position_ids": batch["position_ids"].to(device, non_blocking=True)}
    if "doc_ids" in batch:
        out["doc_ids"] = batch["doc_ids"].to(device, non_blocking=True)
    return out


def count_tokens(batches: list[dict], dims) -> torch.Tensor:
    """Real tokens in the global batch of this step (a float64 scalar, identical on all ranks)."""
    n = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
    t = torch.tensor(float(n), dtype=torch.float64, device=dims.device)
    return all_reduce_sum(t, dims)


def forward_backward(model, batches: list[dict], dims, cfg, n_loops: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate gradients of (global mean loss) over the micro-batches; returns (loss, tokens)."""
    begin_train_step(model)  # σReparam layers: one power iteration in this step's first forward
    n_global = count_tokens(batches, dims)
    if dims.pp > 1:  # the pipeline schedule runs every micro-batch's forward and backward
        with _autocast(cfg, dims.device):
            loss_sum = model.step(batches, n_global)  # parallel.pipeline.PipelineModel; loops fixed
        return all_reduce_sum(loss_sum, dims) / n_global.clamp(min=1), n_global
    extra = {"n_loops": n_loops} if n_loops is not None else {}
    loss_sum = torch.zeros((), dtype=torch.float64, device=dims.device)
    for batch in batches:
        with _autocast(cfg, dims.device):
            local = model(**model_kwargs(batch, dims.device), labels=batch["labels"].to(dims.device), **extra)
        (local / n_global.clamp(min=1).to(local.dtype)).backward()
        loss_sum += local.detach().double()
    loss = all_reduce_sum(loss_sum, dims) / n_global.clamp(min=1)
    return loss, n_global


@torch.no_grad()
def evaluate(model, loader, dims, cfg, n_batches: int) -> float:
    """Mean token loss over ``n_batches`` held-out global batches (fixed loop count)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=dims.device)
    count = torch.zeros((), dtype=torch.float64, device=dims.device)
    for _ in range(n_batches):
        batch = next(loader)
        with _autocast(cfg, dims.device):
            if dims.pp > 1:
                total += model.loss_sum(batch)
            else:
                total += model(**model_kwargs(batch, dims.device), labels=batch["labels"].to(dims.device)).double()
        count += float((batch["labels"] != IGNORE_INDEX).sum())
    model.train(was_training)
    total = all_reduce_sum(total, dims)
    count = all_reduce_sum(count, dims)
    return float(total / count.clamp(min=1))
