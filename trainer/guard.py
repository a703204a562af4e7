"""Guarding the optimizer step against bad numbers.

Owns: ``StepGuard``, which decides after backward whether a step may update the weights. A
non-finite loss or gradient norm, or (when ``optim.spike_factor`` > 0) a loss above that factor
times the mean of recent losses, is handled by ``optim.on_nonfinite``: ``skip`` drops the update
and logs it, ``stop`` raises, ``rollback`` asks the checkpointer to reload the last checkpoint.
"""

from __future__ import annotations

import math


class NonFiniteError(RuntimeError):
    pass


class RollbackRequested(RuntimeError):
    pass


class StepGuard:
    WINDOW = 20

    def __init__(self, cfg, is_main: bool):
        self.policy = cfg.optim.on_nonfinite
        self.spike = cfg.optim.spike_factor
        self.is_main = is_main

    def accept(self, state, loss: float, grad_norm: float) -> bool:
        """True to apply the update. Every rank sees the same reduced loss and norm, so every rank
        takes the same decision without another collective."""
        reason = None
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            reason = f"non-finite loss={loss} grad_norm={grad_norm}"
        elif self.spike > 0 and len(state.losses) >= 5:
            mean = sum(x for _, x in state.losses) / len(state.losses)
            if loss > self.spike * mean:
                reason = f"loss spike {loss:.4g} > {self.spike} x recent mean {mean:.4g}"
        if reason is None:
            state.losses = (state.losses + [[state.step, loss]])[-self.WINDOW:]
            return True
        msg = f"step {state.step}: {reason}"
        if self.policy == "stop":
            raise NonFiniteError(msg + " (optim.on_nonfinite=stop; use skip or rollback to continue instead)")
        if self.policy == "rollback":
            raise RollbackRequested(msg)
        state.skipped_steps += 1
        if self.is_main:
            print(f"[longtrain] skipped update at {msg} (optim.on_nonfinite=skip)")
        return False
