"""Fault injection for reliability tests: ``LONGTRAIN_FAULT=kill@step:3:phase=backward:rank=1``.

Owns: parsing ``LONGTRAIN_FAULT`` and ``install_faults``, which hooks the faults into a live
model, optimizer, mesh and checkpoint writer. Unset (the normal case) it returns None and hooks
nothing: no code path of a real run changes.

A spec is ``ACTION@step:N[:phase=P][:rank=R][:attempt=A]``; several are separated by ``,``.
Step N is the 0-based training step (``TrainState.step`` while it runs; for ``checkpoint-write``
the step being saved). ``rank`` defaults to every rank, ``attempt`` to 0: the fault fires in the
first run of the job only, not again after the launcher restarts it (else a killed run would be
killed again at the same step for ever). Each fault fires once per process.

Phases, and where they fire (mid-way, not between steps):

- ``forward``          a forward pre-hook on a module in the middle of the model;
- ``backward``         a gradient hook on that module's output: half the backward has run;
- ``optimizer``        a step post-hook: the weights are updated, the step counter and the LR
                       schedule are not yet -- the most inconsistent moment of a step;
- ``checkpoint-write`` inside DCP's file writer: after this rank wrote its shards and before
                       ``.metadata`` exists (``enospc``: instead of writing them);
- ``collective``       just before a marked collective (``dims.watch``), e.g. an all-reduce; step N is
                       the loop's step then (the flag all-reduce after step N is at step N).

Actions: ``kill`` (SIGKILL this process), ``stall`` (sleep for ever), ``raise`` (RuntimeError),
``enospc`` (OSError ENOSPC, checkpoint-write only), ``nan`` / ``inf`` (the loss of that step, at
``forward``, or the gradients, at ``backward``, become non-finite), ``spike`` (the loss is
multiplied by 1000 at ``forward``).
"""

from __future__ import annotations

import errno
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch.distributed.checkpoint import filesystem

from longtrain.config import ConfigError

ENV = "LONGTRAIN_FAULT"
PHASES = ("forward", "backward", "optimizer", "checkpoint-write", "collective")
ACTIONS = {  # action -> (phases it may use, default phase)
    "kill": (PHASES, "forward"),
    "stall": (PHASES, "collective"),
    "raise": (PHASES, "forward"),
    "enospc": (("checkpoint-write",), "checkpoint-write"),
    "nan": (("forward", "backward"), "forward"),
    "inf": (("forward", "backward"), "forward"),
    "spike": (("forward",), "forward"),
}
SPIKE = 1000.0
_ACTIVE: list = []  # the injector installed in this process, removed by the next install_faults


@dataclass(frozen=True)
class Fault:
    action: str
    step: int
    phase: str
    rank: Optional[int] = None
    attempt: int = 0

    def __str__(self) -> str:
        return (f"{self.action}@step:{self.step}:phase={self.phase}"
                + (f":rank={self.rank}" if self.rank is not None else "") + f":attempt={self.attempt}")


def parse_faults(text: str) -> list[Fault]:
    """``kill@step:3:phase=backward:rank=1,nan@step:5`` -> faults; ConfigError naming the fix."""
    out = []
    example = "e.g. LONGTRAIN_FAULT=kill@step:3:phase=backward:rank=1"
    for spec in filter(None, (s.strip() for s in text.split(","))):
        m = re.fullmatch(r"(\w+)@step:(\d+)((?::\w+=[\w-]+)*)", spec)
        if not m:
            raise ConfigError(f"{ENV} entry {spec!r} must look like ACTION@step:N[:phase=P][:rank=R][:attempt=A], "
                              f"{example}.")
        action, step, rest = m.group(1), int(m.group(2)), m.group(3)
        if action not in ACTIONS:
            raise ConfigError(f"{ENV} entry {spec!r}: action {action!r} is not one of {sorted(ACTIONS)}.")
        allowed, phase = ACTIONS[action]
        kw = dict(kv.split("=", 1) for kv in rest.split(":") if kv)
        unknown = set(kw) - {"phase", "rank", "attempt"}
        if unknown:
            raise ConfigError(f"{ENV} entry {spec!r}: unknown field(s) {sorted(unknown)}; use phase, rank, attempt.")
        phase = kw.get("phase", phase)
        if phase not in allowed:
            raise ConfigError(f"{ENV} entry {spec!r}: {action} works at phase {' / '.join(allowed)}, not {phase!r}.")
        try:
            rank = int(kw["rank"]) if "rank" in kw else None
            attempt = int(kw.get("attempt", 0))
        except ValueError:
            raise ConfigError(f"{ENV} entry {spec!r}: rank and attempt must be integers.") from None
        out.append(Fault(action, step, phase, rank, attempt))
    return out


class FaultInjector:
    """The faults for this process (rank, attempt) and the hooks that fire them."""

    def __init__(self, faults: list[Fault], rank: int, attempt: int, state):
        self.faults = [f for f in faults if (f.rank is None or f.rank == rank) and f.attempt == attempt]
        self.rank, self.state = rank, state
        self.fired: list[Fault] = []
        self._hooks: list = []
        self._unpatch = None

    def due(self, phase: str, step: Optional[int] = None) -> Optional[Fault]:
        step = int(self.state.step) if step is None else step
        for f in self.faults:
            if f.phase == phase and f.step == step and f not in self.fired:
                return f
        return None

    def fire(self, phase: str, step: Optional[int] = None, where: str = "") -> Optional[Fault]:
        """Run the due fault of ``phase``; returns tensor-changing faults for the caller to apply."""
        f = self.due(phase, step)
        if f is None:
            return None
        self.fired.append(f)
        print(f"[longtrain] rank {self.rank}: injecting fault {f}" + (f" ({where})" if where else ""),
              file=sys.stderr, flush=True)
        if f.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if f.action == "stall":
            while True:
                time.sleep(3600)
        if f.action == "raise":
            raise RuntimeError(f"injected fault {f} on rank {self.rank}")
        if f.action == "enospc":
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected fault {f})", where)
        return f

    # ---------------------------------------------------------------- hooks

    def install(self, model, optimizer, dims) -> "FaultInjector":
        phases = {f.phase for f in self.faults}
        if phases & {"forward", "backward"}:
            mid = _middle_module(model)

            def pre(module, args):
                f = self.due("forward")
                if f is not None and f.action in ("kill", "stall", "raise"):
                    self.fire("forward", where=f"forward of {type(module).__name__}")

            def post(module, args, out):
                f = self.due("backward")
                if f is not None and torch.is_grad_enabled() and isinstance(out, torch.Tensor) and out.requires_grad:
                    def grad_hook(g, _f=f):
                        got = self.fire("backward", step=_f.step, where=f"backward of {type(module).__name__}")
                        if got is not None:  # nan / inf: poison every gradient upstream of here
                            return g * float(got.action)
                        return g

                    out.register_hook(grad_hook)

            def top(module, args, out):  # the model's output is its loss sum when labels are given
                f = self.due("forward")
                if f is not None and f.action in ("nan", "inf", "spike") and isinstance(out, torch.Tensor):
                    self.fire("forward", where="model output (loss)")
                    return out * (SPIKE if f.action == "spike" else float(f.action))
                return out

            self._hooks += [mid.register_forward_pre_hook(pre), mid.register_forward_hook(post),
                            model.register_forward_hook(top)]
        if "optimizer" in phases:
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise ConfigError(f"{ENV}: phase=optimizer needs a torch.optim.Optimizer, got {type(optimizer).__name__}.")
            self._hooks.append(optimizer.register_step_post_hook(
                lambda opt, args, kwargs: self.fire("optimizer", where="after the parameter update")))
        if "collective" in phases:
            if dims.watchdog is None:
                raise ConfigError(f"{ENV}: phase=collective needs more than one process (no collectives here).")
            # at the watchdog's step: the flag all-reduce after a step belongs to that step, not the next
            dims.watchdog.before_op = lambda op: self.fire("collective", step=dims.watchdog.step,
                                                           where=f"before {op}")
        if "checkpoint-write" in phases:
            self._unpatch = _patch_checkpoint_writer(self)
        return self

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self._unpatch is not None:
            self._unpatch()
            self._unpatch = None


def _middle_module(model):
    """A module that owns parameters, halfway through the model's module order."""
    mods = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    return mods[len(mods) // 2] if mods else model


def _patch_checkpoint_writer(inj: FaultInjector):
    """Wrap DCP's file writer so a fault can fire inside a checkpoint write (restored by the caller)."""
    cls = filesystem._FileSystemWriter
    original = cls.write_data

    def write_data(self, plan, planner):
        m = re.search(r"step-(\d+)\.tmp", str(self.path))
        step = int(m.group(1)) if m else None
        f = inj.due("checkpoint-write", step) if step is not None else None
        if f is not None and f.action == "enospc":  # the disk is full before this rank's shards fit
            inj.fire("checkpoint-write", step, where=str(self.path))
        fut = original(self, plan, planner)  # writes this rank's shards (synchronously)
        if f is not None and f.action != "enospc":  # shards on disk, .metadata not yet
            inj.fire("checkpoint-write", step, where=f"{self.path}, shards written, no .metadata yet")
        return fut

    cls.write_data = write_data

    def undo():
        cls.write_data = original

    return undo


def install_faults(model, optimizer, state, dims) -> Optional[FaultInjector]:
    """Hooks for ``$LONGTRAIN_FAULT`` on this rank and attempt; None (nothing hooked) when unset."""
    while _ACTIVE:  # an earlier run in this process (tests) that ended by an exception
        _ACTIVE.pop().remove()
    text = os.environ.get(ENV, "").strip()
    if not text:
        return None
    attempt = int(os.environ.get("LONGTRAIN_RESTART_COUNT") or os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
    inj = FaultInjector(parse_faults(text), int(dims.rank), attempt, state)
    if inj.faults and dims.is_main:
        print(f"[longtrain] {ENV}: {', '.join(map(str, inj.faults))} armed (attempt {attempt})", flush=True)
    _ACTIVE.append(inj)
    return inj.install(model, optimizer, dims)
