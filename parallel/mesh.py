"""The device mesh: which rank holds which slice of data, sequence, heads and layers.

Owns: ``ParallelDims`` (the sizes from ``cfg.parallel``, checked against the world size and the
model, plus the one named ``DeviceMesh`` and every rank / size derived from it) and
``init_distributed(cfg)`` (environment -> process group -> mesh).

The mesh has five named dimensions, outermost first::

    ("pp", "dp_replicate", "dp_shard", "sp", "tp")

Innermost is the most communication-heavy: tensor parallel talks inside every layer (keep it in
one NVLink island), Ulysses once per attention, FSDP once per block, replication once per step.
Three flattened views serve the callers:

- ``dp``          = dp_replicate x dp_shard: ranks that read different samples (the data loader);
- ``dp_shard_sp`` = dp_shard x sp: ranks that hold the same parameters and different tokens, so
  FSDP shards over them (Ulysses ranks would otherwise keep redundant copies);
- ``dp_sp``       = dp_replicate x dp_shard x sp: ranks whose token losses add up to the global
  loss (token counts and logged loss are summed over it).

Every size is kept in the mesh (size-1 dimensions included), so ``get_group("sp")`` always works
and a rank or size is computed in exactly one place. One ``ParallelDims`` object is passed
explicitly to whoever needs it; there is no global state. World size 1 is the special case with
no process group and no mesh, except in bf16 or with ``memory.fsdp_cpu_offload``, where FSDP2
(its mixed precision, its CPU offload) needs a one-rank group and mesh (``one_rank_fsdp``); the process still counts as world size 1. Tensor or pipeline
parallelism with no data-parallel peers is wrapped the same way, over the one-rank ``dp_shard_sp``
mesh.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from longtrain.config import ConfigError
from longtrain.parallel.precision import fsdp_wraps, one_rank_note, param_dtype_name
from longtrain.parallel.watchdog import CollectiveWatchdog, default_store

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "sp", "tp")
# flattened views: name -> the mesh dims it spans (contiguous in MESH_DIMS, as flattening needs)
FLAT_DIMS = {
    "dp": ("dp_replicate", "dp_shard"),
    "dp_shard_sp": ("dp_shard", "sp"),
    "dp_sp": ("dp_replicate", "dp_shard", "sp"),
}


def _divisors(n: int) -> str:
    return "{" + ", ".join(str(d) for d in range(1, n + 1) if n % d == 0) + "}"


@dataclass
class ParallelDims:
    """Mesh sizes (already resolved: ``dp_shard`` is never -1 here) and, once built, the mesh."""

    dp_replicate: int
    dp_shard: int
    sp: int
    tp: int
    pp: int
    world_size: int
    rank: int = 0
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: Optional["torch.distributed.device_mesh.DeviceMesh"] = None
    # the flattened views, kept here: slicing them back out of the root mesh is deprecated
    flat_meshes: dict = field(default_factory=dict, repr=False)
    # names the stuck rank and operation when a collective hangs (parallel.watchdog); None in one process
    watchdog: Optional["CollectiveWatchdog"] = field(default=None, repr=False, compare=False)
    # FSDP2 wraps the model (parallel.precision.fsdp_wraps, decided by init_distributed, which
    # builds the mesh it needs). With no data-parallel peers that is the one-rank wrapping for bf16
    # mixed precision or memory.fsdp_cpu_offload; for one process it also means a one-rank process
    # group exists. ``one_rank_note`` says what it is for, on the start-up mesh line.
    fsdp: bool = False
    one_rank_note: str = "FSDP2 on one rank"

    @property
    def one_rank_fsdp(self) -> bool:
        """FSDP2 wraps the model though no rank shares its parameters (see ``fsdp``)."""
        return self.fsdp and self.dp_replicate * self.dp_shard * self.sp == 1

    # ---------------------------------------------------------------- construction and checks

    @classmethod
    def from_config(cls, cfg, world_size: int, rank: int = 0, local_rank: int = 0,
                    device: torch.device | None = None) -> "ParallelDims":
        """Resolve ``dp_shard=-1`` and check every size against the world and the model.

        Pure: needs no process group, so configuration errors surface before any rank waits.
        """
        p = cfg.parallel
        named = {"parallel.dp_replicate": p.dp_replicate, "parallel.tp": p.tp, "parallel.sp": p.sp,
                 "parallel.pp": p.pp}
        for key, v in named.items():
            if v < 1:
                raise ConfigError(f"{key}={v} must be >= 1.")
        fixed = p.dp_replicate * p.tp * p.sp * p.pp
        sizes = " * ".join(f"{k}={v}" for k, v in named.items())
        if p.dp_shard == -1:
            if world_size % fixed:
                raise ConfigError(
                    f"world size {world_size} is not divisible by {sizes} (= {fixed}), so "
                    f"parallel.dp_shard=-1 cannot fill the rest; choose sizes whose product divides "
                    f"{world_size}, or launch a multiple of {fixed} processes.")
            dp_shard = world_size // fixed
        elif p.dp_shard < 1:
            raise ConfigError(f"parallel.dp_shard={p.dp_shard} must be >= 1, or -1 to fill the world size.")
        else:
            dp_shard = p.dp_shard
        if fixed * dp_shard != world_size:
            raise ConfigError(
                f"{sizes} * parallel.dp_shard={dp_shard} = {fixed * dp_shard}, but the world size is "
                f"{world_size}; their product must equal the number of processes. Set "
                f"parallel.dp_shard=-1 to fill the rest, or change the sizes or the process count.")
        dims = cls(dp_replicate=p.dp_replicate, dp_shard=dp_shard, sp=p.sp, tp=p.tp, pp=p.pp,
                   world_size=world_size, rank=rank, local_rank=local_rank,
                   device=device if device is not None else torch.device("cpu"))
        dims.check_model(cfg.model, cfg.data.seq_len)
        return dims

    def check_model(self, m, seq_len: int) -> None:
        """Sizes that must divide the model's heads, widths and the sequence."""
        tp, sp = self.tp, self.sp
        if m.n_heads % tp:
            raise ConfigError(f"parallel.tp={tp} does not divide model.n_heads={m.n_heads}; "
                              f"use tp in {_divisors(m.n_heads)}.")
        if m.n_kv_heads % tp:
            raise ConfigError(f"parallel.tp={tp} does not divide model.n_kv_heads={m.n_kv_heads} (tensor "
                              f"parallel splits whole key/value heads); use tp in {_divisors(m.n_kv_heads)}.")
        if (m.n_heads // tp) % sp:
            local = m.n_heads // tp
            raise ConfigError(
                f"parallel.sp={sp} does not divide model.n_heads={m.n_heads}"
                + (f" / parallel.tp={tp} = {local} heads per tensor-parallel rank" if tp > 1 else "")
                + f"; Ulysses gives each rank whole heads, so use sp in {_divisors(local)}.")
        for key, width in (("model.ffn_dim", m.ffn_dim), ("model.vocab_size", m.vocab_size)):
            if width % tp:
                raise ConfigError(f"parallel.tp={tp} does not divide {key}={width}; choose tp in "
                                  f"{_divisors(width)} or change {key}.")
        if seq_len % (sp * tp):
            raise ConfigError(
                f"data.seq_len={seq_len} is not divisible by parallel.sp * parallel.tp = {sp} * {tp} = "
                f"{sp * tp}; each rank holds seq_len / (sp * tp) tokens of the residual stream. Use a "
                f"seq_len that is a multiple of {sp * tp}.")

    def build_mesh(self, device_type: str) -> None:
        """The one DeviceMesh over all ranks, plus its flattened views."""
        from torch.distributed.device_mesh import init_device_mesh

        shape = tuple(getattr(self, d) for d in MESH_DIMS)
        self.mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)
        self.flat_meshes = {name: self.mesh[parts]._flatten(mesh_dim_name=name)
                            for name, parts in FLAT_DIMS.items()}

    # ---------------------------------------------------------------- what callers ask for

    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def sp_size(self) -> int:
        return self.sp

    @property
    def tp_size(self) -> int:
        return self.tp

    @property
    def pp_size(self) -> int:
        return self.pp

    def size(self, name: str) -> int:
        """Size of a mesh dimension or flattened view ("dp", "dp_shard_sp", "dp_sp", "tp", ...)."""
        if name in MESH_DIMS:
            return getattr(self, name)
        if name in FLAT_DIMS:
            out = 1
            for d in FLAT_DIMS[name]:
                out *= getattr(self, d)
            return out
        raise KeyError(f"unknown mesh dimension {name!r}; known: {MESH_DIMS + tuple(FLAT_DIMS)}")

    def local_rank_in(self, name: str) -> int:
        """This rank's index along a mesh dimension or flattened view (0 without a mesh)."""
        self.size(name)  # validates the name
        if self.mesh is None:
            return 0
        return self.get_mesh(name).get_local_rank()

    @property
    def dp_rank(self) -> int:
        return self.local_rank_in("dp")

    @property
    def sp_rank(self) -> int:
        return self.local_rank_in("sp")

    @property
    def tp_rank(self) -> int:
        return self.local_rank_in("tp")

    @property
    def pp_rank(self) -> int:
        return self.local_rank_in("pp")

    def get_mesh(self, name: str | tuple[str, ...]):
        """A (sub)mesh by name, e.g. "tp", "dp_shard_sp" or ("dp_replicate", "dp_shard_sp")."""
        if self.mesh is None:
            return None
        if isinstance(name, str) and name in self.flat_meshes:
            return self.flat_meshes[name]
        return self.mesh[name]

    def get_group(self, name: str) -> Optional[dist.ProcessGroup]:
        """The process group of one dimension or flattened view; None in a single process."""
        self.size(name)
        if self.mesh is None:
            return None
        return self.get_mesh(name).get_group()

    def watch(self, op: str):
        """Context marking ``op`` (a collective or a stretch holding some) for the hang watchdog."""
        return self.watchdog.watch(op) if self.watchdog is not None else contextlib.nullcontext()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        return (f"mesh: pp={self.pp} dp_replicate={self.dp_replicate} dp_shard={self.dp_shard} "
                f"sp={self.sp} tp={self.tp} (world {self.world_size})"
                + (f"; {self.one_rank_note}" if self.one_rank_fsdp else ""))


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} must be an integer (set by the launcher).") from None


def _backend(cfg) -> str:
    b = cfg.parallel.backend
    if b == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if b == "nccl" and not torch.cuda.is_available():
        raise ConfigError("parallel.backend=nccl needs CUDA GPUs, but none is visible; use "
                          "parallel.backend=gloo (or auto) on CPU.")
    return b


def init_distributed(cfg) -> ParallelDims:
    """Read the launcher's environment (torchrun names), start the process group, build the mesh.

    RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT as torchrun sets them; absent
    means a single process (no process group). If the default group is already initialised
    (a test harness, an outer framework) it is reused. The init timeout is long (slow nodes,
    large clusters); afterwards every group gets the shorter training timeout so a hung
    collective fails in minutes instead of hanging the job; the ``CollectiveWatchdog`` started here
    makes that failure name the stuck rank and operation (``parallel.watchdog``).
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if dist.is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()
    backend = _backend(cfg) if world_size > 1 else None
    use_cuda = (backend == "nccl") or (world_size == 1 and torch.cuda.is_available()
                                       and cfg.schedule.device != "cpu")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    # checks before the process group: a config error must not leave other ranks waiting
    dims = ParallelDims.from_config(cfg, world_size, rank=rank, local_rank=local_rank, device=device)
    wraps = fsdp_wraps(dims.dp_replicate, dims.dp_shard, dims.sp, param_dtype_name(cfg, device.type),
                       cfg.memory.fsdp_cpu_offload)
    if world_size == 1:
        if wraps:
            # FSDP2 needs a mesh even for its mixed precision alone: a one-rank group on an
            # in-memory store (no rendezvous, no MASTER_ADDR), kept with world_size 1 so the rest of
            # the trainer still runs as one process (parallel.fsdp, "One process in bf16")
            if not dist.is_initialized():
                dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                        store=dist.HashStore(), rank=0, world_size=1,
                                        device_id=device if device.type == "cuda" else None)
            dims.build_mesh(device.type)
            dims.fsdp = True
            dims.one_rank_note = one_rank_note(cfg, device.type)
        return dims
    if not dist.is_initialized():
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise ConfigError(f"WORLD_SIZE={world_size} but {var} is not set; start the job with a "
                                  f"launcher (torchrun, `longtrain launch`) that sets it.")
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=cfg.parallel.init_timeout_s),
                                device_id=device if device.type == "cuda" else None)
    dims.build_mesh(device.type)
    # tensor or pipeline parallelism alone wraps too: FSDP2 over the one-rank dp_shard_sp mesh
    dims.fsdp = wraps
    dims.one_rank_note = one_rank_note(cfg, device.type)
    _set_training_timeout(dims, cfg.parallel.timeout_s)
    wd_interval = min(5.0, max(0.2, cfg.parallel.timeout_s / 20))
    dims.watchdog = CollectiveWatchdog(rank, world_size, cfg.parallel.timeout_s,
                                       store=default_store(max(5.0, 4 * wd_interval)),
                                       interval=wd_interval).start()
    return dims


def _set_training_timeout(dims: ParallelDims, seconds: float) -> None:
    """Shorten the timeout of the default group and every mesh group, after init."""
    from torch.distributed.distributed_c10d import _set_pg_timeout

    timeout = timedelta(seconds=seconds)
    groups = {id(dist.group.WORLD): dist.group.WORLD}
    for name in MESH_DIMS + tuple(FLAT_DIMS):
        g = dims.get_group(name)
        groups[id(g)] = g
    for g in groups.values():
        try:
            _set_pg_timeout(timeout, g)
        except (ValueError, RuntimeError, AttributeError):
            pass  # a backend without settable timeouts keeps its init timeout
