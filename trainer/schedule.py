"""Learning-rate schedule: linear warmup, then cosine decay to ``min_lr_ratio`` of the peak.

Owns: ``build_lr_scheduler``. A ``LambdaLR`` so its state (the step count) checkpoints with the
optimizer through the standard ``state_dict`` and resumes exactly.
"""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_lr_scheduler(optimizer: torch.optim.Optimizer, sched_cfg) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, sched_cfg.warmup_steps, sched_cfg.steps, sched_cfg.min_lr_ratio),
    )
