"""The optimizer, on the GPU or offloaded: AdamW parameter groups, CPU Adam, FSDP2 CPU offload.

Owns: ``build_optimizer(model, cfg)`` (the one constructor the trainer calls),
``CPUOffloadAdamW`` (Adam state and fp32 master weights in host memory, stepped by
DeepSpeed's vectorised ``DeepSpeedCPUAdam`` when its extension builds, else by torch's AdamW on
CPU tensors), ``cpu_adam_available`` and ``fsdp_offload_policy(cfg)`` for the parallel code.

The idea (ZeRO-Offload): Adam keeps 12 bytes per parameter (fp32 master, m, v) against 2-4 for
the model's weights; moving them to the host frees most of the static GPU memory, and the
update is bandwidth-bound work a many-core CPU does well. ``step()`` overlaps the three phases
over buckets of parameters: all gradient copies device-to-host are queued at once on a side
stream; the CPU updates bucket k as soon as its copies land while later buckets are still in
flight; the updated weights go back host-to-device on the side stream, and the compute stream
waits for them only at the end, so the next forward queues behind the copies instead of the host
waiting. Gradient clipping changes the gradients after backward, so copies start in ``step()``,
not during backward.

Parameters that are DTensors (FSDP2 or tensor-parallel shards) are handled through their local
shards: each rank keeps and updates only the state of what it holds. Weight decay applies to
tensors with two or more dimensions (matrices, embeddings), not to norms' gains.
"""

from __future__ import annotations

import functools
import logging
import warnings

import torch
import torch.nn as nn
from torch.distributed.fsdp import CPUOffloadPolicy
from torch.distributed.tensor import DTensor

from longtrain.config import ConfigError


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed (>= 2-D) and not decayed (1-D) trainable parameters."""
    decay, no_decay = [], []
    for p in model.parameters():  # tied weights appear once
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


@functools.lru_cache(maxsize=1)
def cpu_adam_available() -> tuple[bool, str]:
    """Whether ``DeepSpeedCPUAdam`` imports and its C++ op builds/loads here, and why not."""
    try:
        logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
        # deepspeed is optional (longtrain[deepspeed]): imported only when the CPU optimizer is asked for
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        from deepspeed.ops.op_builder import CPUAdamBuilder

        if not CPUAdamBuilder().is_compatible(verbose=False):
            return False, "CPUAdamBuilder reports the op incompatible with this system"
        probe = torch.zeros(4, requires_grad=True)
        opt = DeepSpeedCPUAdam([probe], lr=0.0)  # JIT-compiles with ninja on first use (~1 min)
        del opt
        return True, "ok"
    except Exception as e:  # ImportError, a compiler failure, a missing ninja ...
        return False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _torch_cpu_adamw(groups, lr, betas, eps):
    for kw in ({"fused": True}, {"foreach": True}, {}):
        try:
            opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kw)
            return opt, f"torch.optim.AdamW({', '.join(f'{k}=True' for k in kw) or 'for-loop'})"
        except (RuntimeError, TypeError, ValueError):
            continue
    raise RuntimeError("could not build torch.optim.AdamW on CPU")  # pragma: no cover


class CPUOffloadAdamW(torch.optim.Optimizer):
    """AdamW whose state and fp32 master weights live in host memory.

    ``param_groups`` hold the model's own parameters (so LR schedulers and gradient clipping see
    the usual optimizer); an inner CPU optimizer holds the masters. ``impl``: ``auto`` (DeepSpeed
    CPU Adam when it builds, else torch), ``deepspeed`` (required) or ``torch``.
    """

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 impl: str = "auto", bucket_mb: float = 64.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.cuda = any(_local(p).is_cuda for g in self.param_groups for p in g["params"])
        self._stream = torch.cuda.Stream() if self.cuda else None
        self._done_event = None
        self.bucket_bytes = int(bucket_mb * 2**20)
        self._master: dict[nn.Parameter, torch.Tensor] = {}
        self._grad_buf: dict[nn.Parameter, torch.Tensor] = {}
        self._staging: dict[nn.Parameter, torch.Tensor] = {}
        inner_groups = []
        for g in self.param_groups:
            masters = []
            for p in g["params"]:
                m = self._new_master(p)
                self._master[p] = m
                masters.append(m)
            inner_groups.append({"params": masters, **{k: v for k, v in g.items() if k != "params"}})
        self.impl = impl
        self.inner, self.impl_name = self._build_inner(inner_groups, lr, betas, eps, impl)

    # ---- construction ----------------------------------------------------------------------

    def _pinned_like(self, t: torch.Tensor, dtype) -> torch.Tensor:
        return torch.empty(t.shape, dtype=dtype, device="cpu", pin_memory=self.cuda)

    def _new_master(self, p) -> torch.Tensor:
        local = _local(p).detach()
        m = self._pinned_like(local, torch.float32)
        m.copy_(local)
        return m

    def _build_inner(self, groups, lr, betas, eps, impl):
        if impl not in ("auto", "deepspeed", "torch"):
            raise ConfigError(f"memory.optimizer_offload_impl={impl!r}; choose auto, deepspeed or torch.")
        if impl in ("auto", "deepspeed"):
            ok, why = cpu_adam_available()
            if ok:
                from deepspeed.ops.adam import DeepSpeedCPUAdam  # optional; cpu_adam_available imported it

                for g in groups:  # DeepSpeed reads its own keys; drop ours
                    g.pop("name", None)
                return DeepSpeedCPUAdam(groups, lr=lr, betas=tuple(betas), eps=eps, adamw_mode=True), \
                    "deepspeed.DeepSpeedCPUAdam"
            if impl == "deepspeed":
                raise ConfigError(f"memory.optimizer_offload_impl=deepspeed but DeepSpeedCPUAdam is not "
                                  f"usable here ({why}); install deepspeed with a C++ compiler and ninja, "
                                  f"or set memory.optimizer_offload_impl=auto.")
            warnings.warn(f"DeepSpeedCPUAdam unavailable ({why}); using torch AdamW on the CPU.")
        return _torch_cpu_adamw(groups, lr, betas, eps)

    # ---- step ------------------------------------------------------------------------------

    def _buckets(self):
        """(outer group, inner group, [params]) in buckets of about ``bucket_bytes`` of masters."""
        for g, ig in zip(self.param_groups, self.inner.param_groups):
            bucket, size = [], 0
            for p in g["params"]:
                if p.grad is None:
                    continue
                bucket.append(p)
                size += _local(p).numel() * 4
                if size >= self.bucket_bytes:
                    yield g, ig, bucket
                    bucket, size = [], 0
            if bucket:
                yield g, ig, bucket

    def _grad_to_host(self, p) -> None:
        """Queue the copy of p's (local) gradient into its host buffer (async on CUDA)."""
        grad = _local(p.grad).detach()
        buf = self._grad_buf.get(p)
        if buf is None or buf.dtype != grad.dtype:
            buf = self._grad_buf[p] = self._pinned_like(grad, grad.dtype)
        if self.cuda and grad.is_cuda:
            with torch.cuda.stream(self._stream):
                buf.copy_(grad, non_blocking=True)
            grad.record_stream(self._stream)
        else:
            buf.copy_(grad)

    def _param_to_device(self, p) -> None:
        local = _local(p).detach()
        m = self._master[p]
        if self.cuda and local.is_cuda:
            src = m
            if local.dtype != torch.float32:  # cast on the host: half the bytes over PCIe
                src = self._staging.get(p)
                if src is None:
                    src = self._staging[p] = self._pinned_like(local, local.dtype)
                src.copy_(m)
            with torch.cuda.stream(self._stream):
                local.copy_(src, non_blocking=True)
        else:
            local.copy_(m)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._done_event is not None:  # staging buffers of the last step must be consumed
            self._done_event.synchronize()
        for g, ig in zip(self.param_groups, self.inner.param_groups):
            for k in ("lr", "betas", "eps", "weight_decay"):  # LR schedulers write the outer groups
                ig[k] = g[k]
        buckets = list(self._buckets())
        events = []
        if self.cuda:
            self._stream.wait_stream(torch.cuda.current_stream())  # backward and clipping are done
        for _, _, bucket in buckets:
            for p in bucket:
                self._grad_to_host(p)
            if self.cuda:
                ev = torch.cuda.Event()
                ev.record(self._stream)
                events.append(ev)
        for i, (_, ig, bucket) in enumerate(buckets):
            if events:
                events[i].synchronize()  # this bucket's gradients are in host memory
            for p in bucket:
                buf = self._grad_buf[p]
                self._master[p].grad = buf if buf.dtype == torch.float32 else buf.float()
            self.inner.step()  # only this bucket's masters have a .grad now; the rest are skipped
            for p in bucket:
                self._param_to_device(p)
                self._master[p].grad = None
                self.state[p] = self.inner.state[self._master[p]]  # visible to generic checkpoint code
        if self.cuda:
            torch.cuda.current_stream().wait_stream(self._stream)
            self._done_event = torch.cuda.Event()
            self._done_event.record(self._stream)
        return loss

    # ---- state -----------------------------------------------------------------------------

    def state_dict(self):
        """The inner optimizer's state dict: standard layout, same parameter order as the model's
        groups, host tensors, and every key of the model's groups (``initial_lr``, ``name``: what
        ``get_state_dict`` flattens per parameter and asks back on load). Masters are not saved:
        they are re-read from the restored weights."""
        sd = self.inner.state_dict()
        for og, ig in zip(self.param_groups, sd["param_groups"]):
            ig.update({k: v for k, v in og.items() if k != "params"})
        return sd

    def load_state_dict(self, state_dict) -> None:
        # a flattened checkpoint's groups hold only the keys of ``param_groups`` (get_state_dict
        # rebuilds them from those): the inner optimizer keeps its own other settings
        groups = state_dict["param_groups"]
        inner_groups = [{**{k: v for k, v in ig.items() if k != "params"},
                         **{k: v for k, v in g.items() if k in ig}} for ig, g in zip(self.inner.param_groups, groups)]
        self.inner.load_state_dict({**state_dict, "param_groups": inner_groups})
        for og, g in zip(self.param_groups, groups):
            og.update({k: v for k, v in g.items() if k != "params"})
        self.reload_masters()

    @torch.no_grad()
    def reload_masters(self) -> None:
        """Copy the model's current weights into the masters (after loading a checkpoint)."""
        for p, m in self._master.items():
            m.copy_(_local(p).detach())
        for p, m in self._master.items():
            if m in self.inner.state:
                self.state[p] = self.inner.state[m]


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW over ``model``'s trainable parameters per ``cfg.optim``; offloaded per ``cfg.memory``.

    - default: ``torch.optim.AdamW`` where the parameters are (DTensor shards included);
    - ``memory.optimizer_offload``: ``CPUOffloadAdamW`` (state and masters in host memory);
    - ``memory.fsdp_cpu_offload``: FSDP2 already keeps parameters and gradients on the host, so
      plain AdamW runs there (torch's fused CPU kernel when available).
    """
    o = cfg.optim
    groups = param_groups(model, o.weight_decay)
    if not groups:
        raise ConfigError("the model has no trainable parameters; nothing for the optimizer to update.")
    betas = (o.beta1, o.beta2)
    if cfg.memory.optimizer_offload:
        return CPUOffloadAdamW(groups, lr=o.lr, betas=betas, eps=o.eps, weight_decay=o.weight_decay,
                               impl=cfg.memory.optimizer_offload_impl)
    on_cpu = all(_local(p).device.type == "cpu" for g in groups for p in g["params"])
    if on_cpu and cfg.memory.fsdp_cpu_offload:
        try:
            return torch.optim.AdamW(groups, lr=o.lr, betas=betas, eps=o.eps, fused=True)
        except (RuntimeError, TypeError):
            pass
    return torch.optim.AdamW(groups, lr=o.lr, betas=betas, eps=o.eps)


def fsdp_offload_policy(cfg):
    """``CPUOffloadPolicy`` for ``fully_shard(..., offload_policy=...)`` or None when off."""
    if not cfg.memory.fsdp_cpu_offload:
        return None
    return CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
