"""Activation offload: saved tensors go to host memory in forward and come back before backward.

Owns: ``PinnedPool`` (a bounded pool of host buffers, pinned on CUDA, reused across steps),
``ActivationOffloader`` (the ``saved_tensors_hooks`` pack/unpack pair, the side stream, the
token-wise split and the prefetch) and ``offload_layer_inputs`` (the wrapper put around each
checkpointed block or core call).

The idea: with recomputation, what a block keeps for backward is essentially its input
(2·dim bytes per token in bf16) -- at a million tokens that is still GiBs per layer. The pack
hook copies it to a host buffer on a side CUDA stream (the caching allocator is told, through
``record_stream``, not to reuse the GPU memory before the copy ends) and returns a handle, so
the GPU tensor is freed as soon as the forward moves on. Under ``selective`` recomputation the
attention output and log-sum-exp a block keeps come here too (``keep``/``take``, the store of
``memory.selective``), so with offload on, nothing a block keeps waits on the GPU. In backward,
unpacking layer k's input waits for its copy and at once starts bringing back the rest of layer
k's tensors and everything the ``prefetch`` wrapped calls before it saved -- what backward needs
next -- so the host-to-device copies hide behind layer k's recompute and backward. MEMO's token-wise split: only ``fraction`` of each tensor's tokens (rows of the
last dimension, i.e. leading tokens of a ``[batch, seq, dim]`` tensor) go to the host; the rest
stays on the GPU, trading GPU memory for PCIe time per layer.

The pool is the only host allocation and is capped by ``memory.host_budget_gb``; when a tensor
does not fit it stays on the GPU (counted in ``stats['fallback']``) rather than growing the host
allocation without bound. On a machine without CUDA the same hooks and pool run with plain
(unpinned) host buffers and synchronous copies, so the path is tested on CPU.

Which saved tensors are moved: floating-point tensors that require grad, are not parameters or
views of parameters, are contiguous and have at least ``min_numel`` elements -- activations,
not weights or the rotary tables shared by every layer. Inside one wrapped call a tensor saved
twice (e.g. the norm output read by wq, wk and wv) is moved once. A region already under a
checkpoint's own hooks is never hooked again (see ``recompute.checkpoint_depth``), and nothing
is hooked while backward recomputes.
"""

from __future__ import annotations

import functools
import threading
import warnings
import weakref
from typing import Callable

import torch
import torch.nn as nn

from longtrain.memory.recompute import checkpoint_depth, in_backward
from longtrain.memory.selective import detached

GiB = 2**30


class PinnedPool:
    """Host byte buffers handed out best-fit and returned for reuse; total size is capped.

    On CUDA each buffer is ordinary host memory page-locked in place with ``cudaHostRegister``,
    of exactly the size asked for. ``torch.empty(..., pin_memory=True)`` would take it from
    PyTorch's caching host allocator, which rounds every block up to a power of two: a pool of
    84.5 GiB of layer inputs held 121 GiB of pinned memory and the kernel killed the process on
    a 128 GiB machine (1×H200, 2026-12-01, docs/performance.md), so the budget would not be one.
    """

    def __init__(self, budget_bytes: int, pin: bool):
        self.budget = int(budget_bytes)
        self.pin = pin
        self.allocated = 0  # bytes held by the pool (in use + free)
        self.in_use = 0
        self.peak_in_use = 0
        self.acquired = 0  # number of buffers handed out, ever
        self._free: list[torch.Tensor] = []
        self._pending: list[tuple[torch.Tensor, object]] = []  # (buffer, event) until H2D is done
        self._registered: set[int] = set()  # data pointers page-locked by ``_new``
        self._lock = threading.RLock()  # __del__ of a handle may release during acquire

    def _reap(self, wait: bool = False) -> None:
        still = []
        for buf, ev in self._pending:
            if ev is None or ev.query():
                self._free.append(buf)
            elif wait:
                ev.synchronize()
                self._free.append(buf)
            else:
                still.append((buf, ev))
        self._pending = still

    def acquire(self, nbytes: int) -> torch.Tensor | None:
        """A uint8 buffer of at least ``nbytes``, or None when the budget is exhausted."""
        with self._lock:
            self._reap()
            fit = [b for b in self._free if b.numel() >= nbytes]
            if not fit and self.allocated + nbytes > self.budget and self._pending:
                self._reap(wait=True)
                fit = [b for b in self._free if b.numel() >= nbytes]
            if fit:
                buf = min(fit, key=torch.Tensor.numel)
                del self._free[next(i for i, b in enumerate(self._free) if b is buf)]
            else:
                while self._free and self.allocated + nbytes > self.budget:  # trade small for big
                    self._drop(self._free.pop(0))
                if self.allocated + nbytes > self.budget:
                    return None
                buf = self._new(nbytes)
                self.allocated += nbytes
            self.in_use += buf.numel()
            self.peak_in_use = max(self.peak_in_use, self.in_use)
            self.acquired += 1
            return buf

    def _new(self, nbytes: int) -> torch.Tensor:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if self.pin:
            cudart = torch.cuda.cudart()
            rc = cudart.cudaHostRegister(buf.data_ptr(), nbytes, 0)
            if rc != cudart.cudaError.success:
                raise RuntimeError(f"activation offload: page-locking {nbytes / GiB:.2f} GiB of host memory "
                                   f"failed ({rc}); lower memory.host_budget_gb (now {self.budget / GiB:g}).")
            self._registered.add(buf.data_ptr())
        return buf

    def _drop(self, buf: torch.Tensor) -> None:
        """Give a free buffer back to the system (unlocked first: its memory may be reused)."""
        self.allocated -= buf.numel()
        if buf.data_ptr() in self._registered:
            self._registered.discard(buf.data_ptr())
            torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())

    def close(self) -> None:
        """Unlock and drop every free buffer (the pool's owner is done with it)."""
        with self._lock:
            self._reap(wait=True)
            while self._free:
                self._drop(self._free.pop())

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 -- interpreter shutdown: CUDA may be gone already
            pass

    def release(self, buf: torch.Tensor, event=None) -> None:
        with self._lock:
            self.in_use -= buf.numel()
            self._pending.append((buf, event))

    def stats(self) -> dict:
        return {"allocated_bytes": self.allocated, "in_use_bytes": self.in_use,
                "peak_in_use_bytes": self.peak_in_use, "acquired": self.acquired}


def _dense_order(t: torch.Tensor) -> tuple | None:
    """The dimension order in which ``t`` is laid out contiguously (outermost first), or None
    when ``t`` is not a permutation of a contiguous tensor (overlapping, or with gaps)."""
    order = tuple(sorted(range(t.dim()), key=lambda i: (-t.stride(i), i)))
    return order if t.permute(order).is_contiguous() else None


def _is_parameter_like(t: torch.Tensor) -> bool:
    return isinstance(t, nn.Parameter) or isinstance(getattr(t, "_base", None), nn.Parameter)


def _local(t: torch.Tensor):
    """(local tensor, rebuild) for a DTensor; (t, None) for a plain tensor.

    A tensor-parallel layer's output handed on as a local tensor may still be the wrapper of an
    asynchronous collective (no storage of its own): the wait gives the plain tensor it stands for,
    which is what is moved and what comes back.
    """
    try:
        from torch.distributed._functional_collectives import AsyncCollectiveTensor
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return t, None
    if isinstance(t, DTensor):
        spec, rg = t._spec, t.requires_grad
        local = t._local_tensor
        if isinstance(local, AsyncCollectiveTensor):
            local = local.wait()
        return local, lambda local: DTensor(local, spec, requires_grad=rg)
    if isinstance(t, AsyncCollectiveTensor):
        return t.wait(), None
    return t, None


class _Packed:
    """One offloaded saved tensor: a host part (first ``n_host`` rows) and a GPU part (the rest)."""

    __slots__ = ("owner", "index", "region", "order", "shape", "dtype", "device", "n_host", "host", "buf", "gpu_rest",
                 "d2h_event", "h2d_event", "loaded", "rebuild", "done", "refs", "ready", "__weakref__")

    def __del__(self):  # graph freed without backward (e.g. eval with grad on): return the buffer
        if getattr(self, "buf", None) is not None and self.owner is not None:
            self.owner.pool.release(self.buf, None)
            self.buf = None


class ActivationOffloader:
    """``saved_tensors_hooks`` that move activations to host buffers and prefetch them back."""

    def __init__(self, host_budget_gb: float, fraction: float = 1.0, prefetch: int = 1,
                 min_numel: int = 1024, device: torch.device | None = None):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"memory.offload_fraction={fraction} must be in [0, 1].")
        self.fraction = fraction
        self.prefetch = max(0, int(prefetch))
        self.min_numel = min_numel
        self.cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
        self.pool = PinnedPool(int(host_budget_gb * GiB), pin=self.cuda)
        self._stream = None
        self._records: list[weakref.ref] = []
        self._dedupe: dict | None = None
        self._region = 0  # wrapped calls so far: the unit prefetch counts in
        self._depth = 0  # > 0 while a wrapped call runs its forward (``keep`` moves outputs then)
        self.stats = {"packed": 0, "offloaded_bytes": 0, "kept_bytes": 0, "fallback": 0, "prefetched": 0}
        self._warned = False

    # ---- streams ---------------------------------------------------------------------------

    @property
    def stream(self):
        if self._stream is None and self.cuda:
            self._stream = torch.cuda.Stream()
        return self._stream

    # ---- pack ------------------------------------------------------------------------------

    def _wants(self, t: torch.Tensor) -> bool:
        return (t.is_floating_point() and t.requires_grad and not _is_parameter_like(t)
                and t.numel() >= self.min_numel and t.is_contiguous() and t.device.type != "meta")

    def pack(self, t: torch.Tensor):
        """The ``saved_tensors_hooks`` pack: a saved activation goes to the host (or stays)."""
        if not self._wants(t):
            return t
        local, rebuild = _local(t)
        if not local.is_contiguous() or local.numel() < self.min_numel:
            return t
        # the same activation saved by several ops (x read by wq, wk, wv) is moved once; a
        # weak reference to its base checks the storage is still the same tensor's, not a
        # freed-and-reused address
        base = local._base if local._base is not None else local
        key = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape),
               local.dtype, local._version)
        if self._dedupe is not None and key in self._dedupe:
            base_ref, rec_ref = self._dedupe[key]
            rec = rec_ref()
            if rec is not None and base_ref() is base and not rec.done:
                rec.refs += 1
                return rec
        rec = self._move(local, rebuild)
        if rec is None:
            return t
        if self._dedupe is not None:
            self._dedupe[key] = (weakref.ref(base), weakref.ref(rec))
        return rec

    # ---- the store of selective recomputation (memory.selective) ---------------------------

    def keep(self, t: torch.Tensor):
        """Record an op output that selective recomputation keeps (an attention output and its
        log-sum-exp): moved like a layer input while a wrapped block runs its forward, else kept
        on the GPU. Called inside a dispatch mode, below autograd."""
        if (self._depth > 0 and not in_backward() and t.is_floating_point()
                and t.numel() >= self.min_numel and t.device.type != "meta"):
            # attention kernels return [batch, heads, seq, dim] views of a sequence-major buffer:
            # move that buffer (token-wise, as the layer inputs) and give back the same view
            order = _dense_order(t)
            if order is not None:
                rec = self._move(t.permute(order), None)
                if rec is not None:
                    rec.order = order
                    return rec
        return detached(t)

    def take(self, record):
        """The tensor ``keep`` recorded, back on its device."""
        return self.unpack(record) if isinstance(record, _Packed) else record

    def _move(self, local: torch.Tensor, rebuild) -> "_Packed | None":
        """Copy the first ``fraction`` of ``local``'s rows to a host buffer (on the side stream)
        and clone the rest; None when nothing moves (no rows, or the pool is full)."""
        rows = local.numel() // local.shape[-1] if local.dim() else 1
        n_host = int(round(rows * self.fraction))
        if n_host == 0:
            return None
        flat = local.view(rows, -1)
        host_part = flat[:n_host]
        nbytes = host_part.numel() * host_part.element_size()
        buf = self.pool.acquire(nbytes)
        if buf is None:
            self.stats["fallback"] += 1
            if not self._warned:
                self._warned = True
                warnings.warn(f"activation offload: the host pool is full "
                              f"(memory.host_budget_gb={self.pool.budget / GiB:g}); further saved "
                              f"tensors stay on the GPU. Raise host_budget_gb or lower offload_fraction.")
            return None
        rec = _Packed()
        rec.owner, rec.shape, rec.dtype, rec.device = self, local.shape, local.dtype, local.device
        rec.n_host, rec.buf, rec.rebuild, rec.done = n_host, buf, rebuild, False
        rec.host = buf[:nbytes].view(local.dtype).view(n_host, -1)
        rec.loaded, rec.h2d_event, rec.d2h_event, rec.refs, rec.ready = None, None, None, 1, None
        rec.region, rec.order = self._region, None
        if local.is_cuda and self.cuda:
            main = torch.cuda.current_stream(local.device)
            side = self.stream
            side.wait_stream(main)  # the producer of t must finish first
            with torch.cuda.stream(side):
                rec.host.copy_(host_part, non_blocking=True)
                rec.d2h_event = torch.cuda.Event()
                rec.d2h_event.record(side)
            local.record_stream(side)  # do not reuse t's memory before the copy ends
        else:
            rec.host.copy_(host_part)
        # the GPU part must not alias t, or t's whole storage would stay alive
        rec.gpu_rest = flat[n_host:].clone() if n_host < rows else None
        if len(self._records) % 256 == 255:  # forwards that never ran backward leave dead refs
            self._records = [r for r in self._records if r() is not None and not r().done]
            for i, r in enumerate(self._records):
                r().index = i
        rec.index = len(self._records)
        self._records.append(weakref.ref(rec))
        self.stats["packed"] += 1
        self.stats["offloaded_bytes"] += nbytes
        self.stats["kept_bytes"] += 0 if rec.gpu_rest is None else rec.gpu_rest.numel() * rec.gpu_rest.element_size()
        return rec

    # ---- unpack ----------------------------------------------------------------------------

    def _load(self, rec: _Packed, device_stream=None) -> None:
        """Start bringing ``rec`` back (idempotent).

        The GPU part joins the full tensor here too, and is dropped at once: a prefetched tensor
        then holds its full size only, not its full size plus the GPU part it was rebuilt from
        until backward reaches it ((1 - fraction) of a layer input less at the backward peak).
        """
        if rec.loaded is not None or rec.ready is not None or rec.done:
            return
        rest = rec.gpu_rest
        rows_total = rec.n_host + (0 if rest is None else rest.shape[0])
        whole = torch.empty(rec.shape, dtype=rec.dtype, device=rec.device)
        out = whole.view(rows_total, -1)
        if rec.device.type == "cuda" and self.cuda:
            main = torch.cuda.current_stream(rec.device)
            side = self.stream
            side.wait_stream(main)  # out's memory may have been used by queued work on main
            with torch.cuda.stream(side):
                out[: rec.n_host].copy_(rec.host, non_blocking=True)
                if rest is not None:
                    out[rec.n_host:].copy_(rest, non_blocking=True)
                rec.h2d_event = torch.cuda.Event()
                rec.h2d_event.record(side)
            out.record_stream(side)
            if rest is not None:
                rest.record_stream(side)  # freed below; not reused before the copy ends
        else:
            out[: rec.n_host].copy_(rec.host)
            if rest is not None:
                out[rec.n_host:].copy_(rest)
        if rec.order is not None:  # the view ``keep`` was given, over the rebuilt buffer
            whole = whole.permute(sorted(range(len(rec.order)), key=rec.order.__getitem__))
        rec.loaded, rec.gpu_rest = whole, None

    def unpack(self, rec):
        if not isinstance(rec, _Packed):
            return rec
        if rec.done:
            raise RuntimeError("activation offload: a saved tensor was unpacked twice; memory.offload "
                               "does not support retain_graph=True or double backward. Set "
                               "memory.offload=false for this use.")
        rec.refs -= 1
        if rec.ready is None:  # first unpack of this handle: finish bringing it back
            self._load(rec)
            out = rec.loaded
            if rec.h2d_event is not None:
                torch.cuda.current_stream(rec.device).wait_event(rec.h2d_event)
            rec.ready = rec.rebuild(out) if rec.rebuild is not None else out
            self.pool.release(rec.buf, rec.h2d_event)
            rec.buf, rec.loaded = None, None
            self._prefetch_before(rec.index)
        result = rec.ready
        if rec.refs > 0:  # the same tensor was saved by several ops; keep it for their unpacks
            return result
        rec.ready, rec.done = None, True
        if rec.index == 0:  # a backward pass is through: forget the finished handles
            self._records = [r for r in self._records if r() is not None and not r().done]
            for i, r in enumerate(self._records):
                r().index = i
        return result

    def _prefetch_before(self, index: int) -> None:
        """Start loading the rest of this handle's wrapped call (the attention output a block
        kept, after its input) and everything the ``prefetch`` wrapped calls before it saved:
        backward reaches them next."""
        me = self._records[index]()
        region = me.region if me is not None else None

        def start(rec) -> None:
            if rec is not None and not rec.done and rec.loaded is None and rec.ready is None:
                self._load(rec)
                self.stats["prefetched"] += 1

        j = index + 1
        while j < len(self._records) and (r := self._records[j]()) is not None and r.region == region:
            start(r)
            j += 1
        j = index - 1
        while j >= 0:
            prev = self._records[j]()
            j -= 1
            if prev is None or prev.done:
                continue
            if region is not None and prev.region < region - self.prefetch:
                break
            start(prev)

    # ---- the region ------------------------------------------------------------------------

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def wrap(self, fn: Callable) -> Callable:
        """``fn`` with its saved tensors offloaded, unless it runs inside a checkpoint or backward."""

        @functools.wraps(fn)
        def run(*args, **kwargs):
            if not torch.is_grad_enabled() or checkpoint_depth() > 0 or in_backward():
                return fn(*args, **kwargs)
            self._dedupe = {}
            self._region += 1
            self._depth += 1
            try:
                with self.hooks():
                    return fn(*args, **kwargs)
            finally:
                self._dedupe = None
                self._depth -= 1

        return run


def offload_layer_inputs(mem, device: torch.device | None = None) -> ActivationOffloader:
    """The offloader for ``mem`` (a ``MemoryConfig``); pass ``.wrap`` to ``apply_recompute``."""
    return ActivationOffloader(mem.host_budget_gb, mem.offload_fraction, mem.offload_prefetch,
                               device=device)
