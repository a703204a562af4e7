"""The one checkpoint manager: sharded, asynchronous, atomic saves and exact (or resharded) resume.

Owns: ``Checkpointer``, what the loop calls (``maybe_resume``, ``after_step``, ``finish``, plus
``request_save`` for on-demand saves and ``rollback`` for the step guard), and writing and
committing a checkpoint. The directory format and everything that reads a checkpoint without a
process group are ``longtrain.trainer.checkpoint_format``; the signals that request a save are
``longtrain.trainer.signals``.

The idea, per property:

- **Sharded and reshardable.** Model and optimizer go through ``get_state_dict`` /
  ``set_state_dict``, so FSDP2/TP parameters are DTensors that DCP writes as chunks of one global
  tensor and reads back into whatever layout the resuming run has. Small states (LR schedule,
  data-loader position, train counters) are pickled blobs; the data position is global (samples
  consumed), so a different dp size continues at the same place. RNG states are per rank and are
  restored only when the layout is unchanged.
- **Named as the whole model.** Keys are the full model's parameter names whatever the layout:
  a pipeline's stage prefix (``parts.<i>.``) is dropped (``PipelineModel.checkpoint_key``) and the
  optimizer state is flattened to one key per parameter (``state.<fqn>.exp_avg``,
  ``param_groups.<fqn>.lr``), so a checkpoint written with one pipeline split loads into another,
  or into none. A weight several stages hold (looped core, tied embedding) is written by each of
  their ranks under one name with equal values; DCP keeps one copy, and a rank holding several
  copies writes one and fills the others from it on load.
- **Atomic.** Ranks write into ``step-N.tmp/``; rank 0 then checks that DCP's metadata is there
  and that every file it references exists and is long enough, renames the directory to
  ``step-N/`` and replaces ``latest`` with ``os.replace``. A killed save leaves only a ``.tmp``
  directory, which resume ignores and the next run deletes.
- **Asynchronous.** ``dcp.async_save`` copies the state to CPU memory (so the next optimizer step
  may change the weights) and writes from a background thread. That thread runs DCP's collectives
  on a process group of its own (gloo), never on the group the training step uses: two threads
  issuing collectives on one group could interleave them. The commit happens in the main thread,
  when ``after_step`` sees the write finished (or before the next save / at ``finish``).
  ``checkpoint.staging=background`` moves the copy off the loop too: a DCP ``DefaultStager``
  fills reused (pinned, on GPU) buffers from a thread while the next forward/backward runs, and
  an optimizer pre-step hook waits for it.
- **Resume.** ``resume=auto`` tries the newest complete checkpoint; one that fails verification
  (missing or truncated shard, missing metadata) is skipped with a warning for the one before.
  A checkpoint of a different model shape is an error, not a fallback: older ones would not fit
  either, and silently starting over would hide it.
- **On-demand saves agree across ranks.** A signal or a time interval may fire on ranks at
  different steps, so ``after_step`` reduces (max) the "save now" / "exit after" flags over all
  ranks each step; every rank then saves the same step.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import shutil
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from longtrain.trainer.checkpoint_format import (FORMAT_VERSION, LATEST, LAYOUT_KEYS, CheckpointCorrupt,
                                                 CheckpointError, CheckpointMismatch, check_model_compatible,
                                                 check_tensor_shapes, read_config, read_latest, read_meta,
                                                 resolve_checkpoint_path, step_dirs, verify_checkpoint)
from longtrain.trainer.hf import load_hf_weights
from longtrain.trainer.signals import EXIT_CODE_CHECKPOINTED, CheckpointedExit

# what a failed write raises: DCP reports a rank's failure (ENOSPC, EROFS, ...) to every rank as a
# CheckpointException, which is a BaseException, so ``except Exception`` alone would let it through
SAVE_ERRORS = (Exception, CheckpointException)


# --------------------------------------------------------------------------------------------
# Durable writes (the commit of a save)
# --------------------------------------------------------------------------------------------


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# Small states and RNG
# --------------------------------------------------------------------------------------------


def _blob(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _unblob(b: Any) -> Any:
    return pickle.loads(b) if isinstance(b, (bytes, bytearray)) else b


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])


def layout_of(dims) -> dict:
    return {k: int(getattr(dims, k, 1)) for k in LAYOUT_KEYS}


def _describe_error(err: BaseException) -> str:
    """One line per failed rank instead of DCP's tracebacks (kept in the exception's cause)."""
    failures = getattr(err, "failures", None)
    if isinstance(err, CheckpointException) and failures:
        parts = []
        for rank, f in sorted(failures.items()):
            exc = f[0] if isinstance(f, tuple) else f
            parts.append(f"rank {rank}: {type(exc).__name__}: {exc}")
        return "; ".join(parts)
    return f"{type(err).__name__}: {err}"


def _out_of_space(root: Path, error_text: str) -> str:
    """The directory whose file system is full when a save failed for lack of space, else "".

    ENOSPC reaches us as "No space left on device" from a plain write, but as the zip writer's
    "unexpected pos A vs B" (a short write) when torch.save's writer hits the full disk; the file
    system's free space (read before the partial save is removed) tells the second case apart.
    """
    if "No space left on device" in error_text or "[Errno 28]" in error_text:
        return str(root)
    if "unexpected pos" in error_text:
        try:
            usage = shutil.disk_usage(root)
        except OSError:
            return ""
        if usage.free < max(1 << 20, usage.total // 100):  # under 1 MiB or 1% left
            return f"{root} ({usage.free} of {usage.total} bytes free)"
    return ""


def _checkpoint_key_fn(model, optimizer: bool):
    """Local ``get_state_dict`` key -> the checkpoint's key (the whole model's name)."""
    key = getattr(model, "checkpoint_key", None)
    if key is None:
        return lambda k: k
    if not optimizer:
        return key

    def optim_key(k: str) -> str:  # "state.<fqn>.exp_avg", "param_groups.<fqn>.lr"
        section, _, rest = k.partition(".")
        return f"{section}.{key(rest, optimizer=True)}"

    return optim_key


def _to_checkpoint_names(local: dict, key_fn) -> tuple[dict, dict, dict[str, str]]:
    """``(local re-keyed by key_fn, local, the key map)``. Of several local keys with one name
    (copies of a shared weight on this rank, equal by construction) the first is written."""
    named, names = {}, {}
    for k, v in local.items():
        names[k] = key_fn(k)
        named.setdefault(names[k], v)
    return named, local, names


def _from_checkpoint_names(loaded: dict, local: dict, names: dict[str, str]) -> dict:
    """What DCP loaded under checkpoint names, back under ``local``'s keys. DCP fills tensors in
    place; another copy of the same weight is filled from it (its own storage: two copies must not
    share optimizer state tensors, or each step would update them twice)."""
    out = {}
    for k, v in local.items():
        got = loaded[names[k]]
        if isinstance(v, torch.Tensor) and got is not v:
            v.copy_(got)
            got = v
        out[k] = got
    return out


def _log(msg: str) -> None:
    print(f"[longtrain] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# The manager
# --------------------------------------------------------------------------------------------


class Checkpointer:
    """Saves and restores the bundle {model, optimizer, lr_scheduler, dataloader, train_state, rng}.

    Every rank constructs it (it may create a process group, a collective). Any of
    ``optimizer``/``scheduler``/``loader``/``state`` may be None, and is then neither saved nor
    restored.
    """

    def __init__(self, cfg, dims, run_dir, *, model, optimizer=None, scheduler=None, loader=None, state=None):
        self.cfg, self.ccfg, self.dims = cfg, cfg.checkpoint, dims
        self.model, self.optimizer, self.scheduler, self.loader, self.state = model, optimizer, scheduler, loader, state
        self.root = Path(self.ccfg.dir) if self.ccfg.dir else Path(run_dir) / "checkpoints"
        self.rank = int(getattr(dims, "rank", 0))
        self.world_size = int(getattr(dims, "world_size", 1))
        self.is_main = self.rank == 0
        self.distributed = self.world_size > 1 and dist.is_available() and dist.is_initialized()
        # DCP's collectives (also those of the async writer thread) run on a group of their own
        self.pg = None
        if self.distributed:
            self.pg = dist.new_group(backend="gloo", timeout=timedelta(seconds=cfg.parallel.init_timeout_s))
        elif dist.is_available() and dist.is_initialized():
            # one process with a process group (FSDP2 on one rank, parallel.fsdp): DCP's async_save
            # wants a group with a CPU backend even when it does not communicate (no_dist), and
            # the default group of a one-GPU run may be NCCL alone
            self.pg = dist.new_group(backend="gloo")
        self._pending: Optional[tuple[int, Path, Any]] = None  # (step, tmp dir, future)
        self._last_saved_step = -1
        self._last_save_time = time.monotonic()
        # requests count up (a signal handler may run between any two bytecodes, also while
        # after_step waits in its collective); after_step acts on the counts it has not seen yet,
        # so a request that lands mid-decision is kept for the next step instead of being cleared
        self._save_requests = self._exit_requests = 0
        self._save_seen = self._exit_seen = 0
        self._rollbacks: dict[str, int] = {}
        self.loaded_from: Optional[Path] = None
        self._staging = None  # checkpoint.staging=background: the copy off the GPU still running
        self._stager: Optional[DefaultStager] = None  # the in-flight save's (background staging)
        self._staging_hook = self._background_staging_hook()

    # ---------------------------------------------------------------- the loop's interface

    @property
    def step(self) -> int:
        return int(self.state.step) if self.state is not None else 0

    def maybe_resume(self) -> Optional[Path]:
        """Resume as ``checkpoint.resume`` says; otherwise start from ``init_from_hf`` if set.

        Returns the checkpoint loaded (None when starting fresh).
        """
        mode = self.ccfg.resume
        if self.is_main:
            self._remove_stale_tmp()
        if mode == "auto":
            candidates = [p for _, p in reversed(step_dirs(self.root))]
            strict = False
        elif mode == "none":
            candidates, strict = [], True
        else:
            candidates, strict = [resolve_checkpoint_path(mode)], True
        failures = []
        for path in candidates:
            try:
                self.load(path)
            except CheckpointCorrupt as e:
                if strict:
                    raise CheckpointCorrupt(f"checkpoint.resume={mode} names a damaged checkpoint: {e} Name an "
                                            f"intact step directory, or set checkpoint.resume=auto (the newest "
                                            f"usable one) or checkpoint.resume=none (start fresh).") from e
                failures.append(str(e))
                if self.is_main:
                    warnings.warn(f"{e} Falling back to the previous checkpoint.", stacklevel=2)
                    _log(f"WARNING: {e} -- trying the previous checkpoint")
                continue
            return path
        if failures:
            raise CheckpointError(f"no usable checkpoint in {self.root}: " + " | ".join(failures)
                                  + " Delete the damaged directories or set checkpoint.resume=none.")
        if self.ccfg.init_from_hf:
            load_hf_weights(self.model, self.ccfg.init_from_hf, self.cfg.model)
            if self.is_main:
                _log(f"initialised weights from Hugging Face checkpoint {self.ccfg.init_from_hf}")
        return None

    def after_step(self) -> None:
        """Commit a finished async save; save on the step interval, the time interval or a request."""
        self._poll_pending()
        step = self.step
        every = self.ccfg.every_steps
        due = bool(every) and step % every == 0
        saves, exits = self._save_requests, self._exit_requests  # one read each: a snapshot
        flags = [saves != self._save_seen or (self.ccfg.every_seconds > 0 and
                                             time.monotonic() - self._last_save_time >= self.ccfg.every_seconds),
                 exits != self._exit_seen]
        self._save_seen, self._exit_seen = saves, exits
        if self.distributed:  # the same decision on every rank (signals arrive at different steps)
            t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=self._collective_device())
            watch = getattr(self.dims, "watch", None) or (lambda op: contextlib.nullcontext())
            with watch("all_reduce(checkpoint flags)"):  # named at the step the loop just ran
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flags = [bool(x) for x in t.tolist()]
        on_demand, exit_after = flags
        if due or on_demand:
            self.save(sync=exit_after or not self.ccfg.async_save)
        if exit_after:
            self.wait()
            if self.is_main:
                _log(f"saved step {step} on request; exiting with code {EXIT_CODE_CHECKPOINTED} so the job "
                     f"can be requeued")
            raise CheckpointedExit(step)

    def finish(self) -> None:
        """The final save (``checkpoint.save_final``) and waiting for every write to commit."""
        if self.ccfg.save_final and self._last_saved_step != self.step:
            self.save(sync=True)
        self.wait()
        if self._staging_hook is not None:
            self._staging_hook.remove()
            self._staging_hook = None
        self._close_stager()

    close = finish

    # ---------------------------------------------------------------- on demand

    def request_save(self, exit_after: bool = False) -> None:
        """Save at the next ``after_step``, then (``exit_after``) raise ``CheckpointedExit``. Safe to
        call from a signal handler (``longtrain.trainer.signals.SaveOnSignal`` does)."""
        self._save_requests += 1
        if exit_after:
            self._exit_requests += 1

    def rollback(self, reason: str = "") -> Path:
        """Reload the newest complete checkpoint after a bad step (``optim.on_nonfinite=rollback``).

        Everything is restored except the data position: the loader keeps going, so the batches
        that produced the bad step are not replayed (replaying them would fail the same way).
        """
        with self._watch("checkpoint rollback"):
            return self._rollback(reason)

    def _rollback(self, reason: str) -> Path:
        self.wait()
        self._barrier()  # rank 0 has committed the in-flight save before anyone lists the directory
        dirs = step_dirs(self.root)
        if not dirs:
            raise CheckpointError(f"{reason}: optim.on_nonfinite=rollback, but no checkpoint exists in "
                                  f"{self.root} yet; set checkpoint.every_steps so one is written, or use "
                                  f"optim.on_nonfinite=skip.")
        path = dirs[-1][1]
        max_per_checkpoint = self.ccfg.max_rollbacks
        n = self._rollbacks.get(str(path), 0) + 1
        if n > max_per_checkpoint:
            raise CheckpointError(f"{reason}: rolled back to {path} {n - 1} times already and the run keeps "
                                  f"diverging (checkpoint.max_rollbacks={max_per_checkpoint}); lower optim.lr or "
                                  f"inspect the data after step {dirs[-1][0]}.")
        self._rollbacks[str(path)] = n
        self.load(path, restore_data=False)
        if self.is_main:
            _log(f"{reason}: rolled back to {path.name} (rollback {n}/{max_per_checkpoint}); the data loader "
                 f"continues past the bad batches")
        return path

    # ---------------------------------------------------------------- save

    def _background_staging_hook(self):
        """``checkpoint.staging=background``: an optimizer pre-step hook that waits for the copy of
        the in-flight save, so parameters change only after they are staged. Optimizers without
        step hooks (none of ours) would wait right after staging starts instead."""
        if self.ccfg.staging != "background" or not self.ccfg.async_save:
            return None
        if hasattr(self.optimizer, "register_step_pre_hook"):
            return self.optimizer.register_step_pre_hook(lambda *args: self.wait_staged())
        return None

    def _new_stager(self) -> DefaultStager:
        """A DCP ``DefaultStager`` for one save: pinned buffers filled by a thread while the next
        forward/backward runs. One per save, closed when it is written: under torch 2.11 a stager
        reused for a second save failed inside its copy (``KeyError: <class 'type'>``, on an H200;
        the cause inside DCP's stager was not pinned down), so the buffers are not reused -- and
        each save pins its buffers anew (measured: +6.8 s and +20.1 s a save for a 1B model)."""
        cuda = getattr(getattr(self.dims, "device", None), "type", "cpu") == "cuda"
        self._stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                    use_async_staging=True, use_non_blocking_copy=cuda))
        return self._stager

    def _close_stager(self) -> None:
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    def wait_staged(self) -> None:
        """Block until the state of the in-flight save is copied off the GPU (background staging)."""
        if self._staging is not None:
            staging, self._staging = self._staging, None
            with self._watch("checkpoint staging"):
                staging.result()

    def _watch(self, op: str):
        """``dims.watch``: a rank stuck in a save is named by the hang watchdog like any collective."""
        watch = getattr(self.dims, "watch", None)
        if getattr(self.dims, "watchdog", None) is not None:
            self.dims.watchdog.step = self.step  # the step whose state is being saved
        return watch(op) if watch is not None else contextlib.nullcontext()

    def save(self, sync: bool = False) -> None:
        """Write the bundle for the current step (async unless ``sync``); returns once staged."""
        self.wait()  # one save in flight at a time; commits the previous one
        if self.step == self._last_saved_step:
            return
        with self._watch("checkpoint save"):
            self._save(sync)

    def _save(self, sync: bool) -> None:
        step = self.step
        tmp = self.root / f"step-{step}.tmp"
        failed: Optional[OSError] = None
        if self.is_main:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                self._write_side_files(tmp, step)
            except OSError as e:  # a full disk, a read-only directory, a file where the directory goes
                failed = e
        # nobody writes into tmp before rank 0 has (re)created it, and nobody writes if it could not
        if self._any_rank(failed is not None):
            self._save_failed(step, tmp, failed or OSError(f"rank 0 could not create {tmp}"))
            return
        state = self._state_for_save()
        self._last_saved_step = step
        self._last_save_time = time.monotonic()
        if sync or not self.ccfg.async_save:
            try:
                dcp.save(state, checkpoint_id=str(tmp), process_group=self.pg, no_dist=not self.distributed)
            except SAVE_ERRORS as e:
                self._save_failed(step, tmp, e)
                return
            self._commit(step, tmp)
            self._barrier()  # a returned synchronous save is committed, on every rank
        else:
            background = self.ccfg.staging == "background"
            extra = {"async_stager": self._new_stager()} if background else {}
            resp = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self.pg,
                                  no_dist=not self.distributed, **extra)
            fut = getattr(resp, "upload_completion", resp)  # AsyncSaveResponse with a stager
            self._pending = (step, tmp, fut)
            self._staging = getattr(resp, "staging_completion", None)
            if self._staging_hook is None:
                self.wait_staged()

    def wait(self) -> None:
        """Block until the in-flight async save is written, then commit it."""
        if self._pending is None:
            return
        self.wait_staged()
        step, tmp, fut = self._pending
        self._pending = None
        try:
            with self._watch("checkpoint write (async)"):
                fut.result()
        except SAVE_ERRORS as e:
            self._save_failed(step, tmp, e)
            return
        finally:
            self._close_stager()  # its pinned buffers go back once the state is written
        self._commit(step, tmp)

    def _poll_pending(self) -> None:
        if self._pending is not None and self._pending[2].done():
            self.wait()

    def _save_failed(self, step: int, tmp: Path, err: Exception) -> None:
        why = _describe_error(err)
        full = _out_of_space(self.root, why)
        msg = f"checkpoint save of step {step} to {tmp} failed: " + (f"no space left on {full} ({why})" if full else why)
        if full or isinstance(err, OSError) or "[Errno" in msg:
            msg += (f". Make checkpoint.dir={str(self.root)!r} a writable directory with room for a "
                    f"checkpoint (or point checkpoint.dir elsewhere)")
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if self.ccfg.on_save_error == "stop":
            raise CheckpointError(msg + " (checkpoint.on_save_error=stop)") from err
        if self.is_main:
            _log(f"WARNING: {msg}; training continues (checkpoint.on_save_error=continue); `latest` still "
                 f"names the previous checkpoint")

    def _commit(self, step: int, tmp: Path) -> None:
        """Rank 0: verify, rename step-N.tmp -> step-N, replace ``latest``, apply retention.

        DCP's coordinator writes ``.metadata`` only after every rank reported its writes done, so
        rank 0 seeing the save finish means all shards are on disk.
        """
        if not self.is_main:
            return
        try:
            verify_checkpoint(tmp)
        except CheckpointError as e:
            self._save_failed(step, tmp, e)
            return
        final = self.root / f"step-{step}"
        if final.exists():  # the same step saved again (e.g. after a rollback): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(self.root)
        _write_atomic(self.root / LATEST, final.name + "\n")
        _log(f"checkpoint {final} committed")
        self._apply_retention()

    def _apply_retention(self) -> None:
        dirs = step_dirs(self.root)
        keep = {s for s, _ in dirs[-self.ccfg.keep_last:]}
        if self.ccfg.keep_every:
            keep |= {s for s, _ in dirs if s % self.ccfg.keep_every == 0}
        latest = read_latest(self.root)
        for s, p in dirs:
            if s not in keep and p != latest:
                shutil.rmtree(p, ignore_errors=True)

    def _remove_stale_tmp(self) -> None:
        if self.root.is_dir():
            for p in self.root.glob("step-*.tmp"):
                _log(f"removing {p} (an interrupted save)")
                shutil.rmtree(p, ignore_errors=True)

    def _write_side_files(self, tmp: Path, step: int) -> None:
        meta = {"format": FORMAT_VERSION, "step": step,
                "tokens": int(getattr(self.state, "tokens", 0)) if self.state is not None else 0,
                "layout": layout_of(self.dims), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "torch": torch.__version__, "arch": self.cfg.model.arch}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        (tmp / "config.yaml").write_text(self.cfg.to_yaml())

    def _state_for_save(self) -> dict:
        model, optim = self._named_state_dicts()
        state: dict = {"model": model[0]}
        if optim is not None:
            state["optimizer"] = optim[0]
        for key, obj in self._small_states(restore_data=True).items():
            state[key] = _blob(obj.state_dict())
        state["rng"] = {f"rank{self.rank}": _blob(rng_state())}
        return state

    # ---------------------------------------------------------------- load

    def load(self, path: str | os.PathLike, restore_data: bool = True) -> None:
        """Load a checkpoint into the live objects (any layout: DCP reshards)."""
        self.wait_staged()  # a save still copying these tensors must finish before they change
        path = Path(path)
        metadata = verify_checkpoint(path)
        saved_cfg = read_config(path)
        meta = read_meta(path)
        check_model_compatible(path, saved_cfg, self.cfg.model)
        keys = set(metadata.state_dict_metadata)
        flat_optim = int(meta.get("format", 1)) >= 2
        if not flat_optim and hasattr(self.model, "checkpoint_key"):
            raise CheckpointMismatch(
                f"checkpoint {path} is in format 1 (meta.json), which a pipeline (parallel.pp="
                f"{getattr(self.dims, 'pp', '?')}) cannot read; load it with parallel.pp=1 and save again "
                f"(any step), then resume that checkpoint with the pipeline.")
        model, optim = self._named_state_dicts(flat_optim)
        check_tensor_shapes(path, metadata, "model", model[0])
        state: dict = {"model": model[0]}
        if optim is not None:
            if not any(k.startswith("optimizer.") for k in keys):
                raise CheckpointMismatch(f"checkpoint {path} holds no optimizer state; this run needs one.")
            state["optimizer"] = optim[0]
        small = self._small_states(restore_data)
        for key in small:
            if key not in keys:
                raise CheckpointCorrupt(f"checkpoint {path}: the {key} state is missing.")
            state[key] = b""
        same_layout = meta.get("layout") == layout_of(self.dims)
        rng_key = f"rng.rank{self.rank}"
        if same_layout and rng_key in keys:
            state["rng"] = {f"rank{self.rank}": b""}
        try:
            dcp.load(state, checkpoint_id=str(path), process_group=self.pg, no_dist=not self.distributed)
        except Exception as e:  # noqa: BLE001 - DCP wraps per-rank failures in CheckpointException
            raise CheckpointCorrupt(f"checkpoint {path} could not be read: {_describe_error(e)[:2000]}") from e
        # state["model"] / state["optimizer"] now hold what was read (tensors filled in place)
        model_local = _from_checkpoint_names(state["model"], *model[1:])
        optim_local = _from_checkpoint_names(state["optimizer"], *optim[1:]) if optim is not None else {}
        set_state_dict(self.model, self.optimizer if optim is not None else [],
                       model_state_dict=model_local, optim_state_dict=optim_local,
                       options=StateDictOptions(flatten_optimizer_state_dict=flat_optim))
        for key, obj in small.items():
            obj.load_state_dict(_unblob(state[key]))
        if "rng" in state:
            set_rng_state(_unblob(state["rng"][f"rank{self.rank}"]))
        self._last_saved_step = int(meta.get("step", -1))
        self._last_save_time = time.monotonic()
        self.loaded_from = path
        if self.is_main:
            how = "same layout" if same_layout else \
                f"resharded from {meta.get('layout')} to {layout_of(self.dims)}; RNG states not restored"
            _log(f"resumed from {path} (step {meta.get('step')}, {how})")

    def _small_states(self, restore_data: bool) -> dict:
        out = {}
        if self.scheduler is not None:
            out["lr_scheduler"] = self.scheduler
        if self.loader is not None and restore_data:
            out["dataloader"] = self.loader
        if self.state is not None:
            out["train_state"] = self.state
        return out

    def _named_state_dicts(self, flat_optim: bool = True):
        """Model and optimizer (None without one) state dicts as ``(keyed as the checkpoint names
        them, as get_state_dict keys them, the key map)``.

        The optimizer state is flattened to one key per parameter: ranks holding different
        parameters (pipeline stages) then never write one key with different contents. (Nested, the
        ``param_groups.<i>.params`` lists of the stages collided and DCP kept one rank's, so the
        other stages lost their hyper-parameters on resume.)
        """
        opts = StateDictOptions(flatten_optimizer_state_dict=flat_optim)
        if self.optimizer is None:
            msd, osd = get_model_state_dict(self.model, options=opts), None
        else:
            msd, osd = get_state_dict(self.model, self.optimizer, options=opts)
        model = _to_checkpoint_names(msd, _checkpoint_key_fn(self.model, optimizer=False))
        optim = None if osd is None else _to_checkpoint_names(osd, _checkpoint_key_fn(self.model, optimizer=True))
        return model, optim

    # ---------------------------------------------------------------- collectives

    def _collective_device(self) -> torch.device:
        backend = dist.get_backend()
        if "nccl" in str(backend):
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _any_rank(self, flag: bool) -> bool:
        """``flag`` or-ed over all ranks (a barrier too)."""
        if not self.distributed:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.pg)
        return bool(t.item())

    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.pg)
