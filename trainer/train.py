"""The training loop: set up from one config, then step, log, evaluate and checkpoint.

Owns: ``train(cfg)``, which every launcher ends up calling in each worker. Features hook in at
its steps (parallelism in ``setup``; the memory policy inside ``parallelize``; the pipeline
through ``forward_backward``; checkpoints through the ``Checkpointer``; the signals that stop a
run through ``signals.SaveOnSignal``) so the loop itself stays on one screen. A single process is
the special case of world size 1.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from longtrain.config import Config
from longtrain.data.loader import build_loader
from longtrain.memory.optimizer_offload import build_optimizer
from longtrain.memory.planner import resolve_policy
from longtrain.models import build_model, sample_loops
from longtrain.models.attention import describe_backends
from longtrain.models.linear_attention import describe_gdn_kernel
from longtrain.models.costs import flops_per_token
from longtrain.parallel.mesh import init_distributed
from longtrain.parallel.parallelize import parallelize
from longtrain.parallel.pipeline import build_pipeline
from longtrain.parallel.reduce import clip_grad_norm_
from longtrain.trainer.checkpoint import Checkpointer
from longtrain.trainer.evaluate import evaluate_in_training
from longtrain.trainer.faults import install_faults
from longtrain.trainer.guard import RollbackRequested, StepGuard
from longtrain.trainer.hf import resolve_hf_config
from longtrain.trainer.ledger import SampleLedger
from longtrain.trainer.metrics import MetricsLogger, device_peak_flops
from longtrain.trainer.run import start_run
from longtrain.trainer.schedule import build_lr_scheduler
from longtrain.trainer.signals import SaveOnSignal
from longtrain.trainer.stability import StabilityMonitor
from longtrain.trainer.step import evaluate, forward_backward


@dataclass
class TrainState:
    """Counters that checkpoint with the run (a torch.distributed.checkpoint ``Stateful``)."""

    step: int = 0
    tokens: int = 0
    skipped_steps: int = 0
    losses: list = field(default_factory=list)  # (step, loss) of the last steps, for spike checks

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "skipped_steps": self.skipped_steps,
                "losses": list(self.losses)}

    def load_state_dict(self, sd: dict) -> None:
        self.step, self.tokens = int(sd["step"]), int(sd["tokens"])
        self.skipped_steps = int(sd.get("skipped_steps", 0))
        self.losses = [list(x) for x in sd.get("losses", [])]


def setup(cfg: Config):
    """Everything the loop needs, built in a fixed order from the config."""
    if cfg.checkpoint.init_from_hf:  # the HF config.json fixes the shapes and rotary settings
        cfg = resolve_hf_config(cfg)
    dims = init_distributed(cfg)
    if cfg.memory.policy == "auto":
        cfg = resolve_policy(cfg, dims)
    torch.manual_seed(cfg.schedule.seed)  # same initial weights on every rank
    # Python's and NumPy's global generators too: unseeded, each process starts them from OS
    # entropy, so the RNG state a checkpoint holds would differ between two runs of one config
    random.seed(cfg.schedule.seed)
    np.random.seed(cfg.schedule.seed)
    with torch.device(dims.device):  # initialise where it runs: an 8B model in seconds on a GPU
        model = build_model(cfg.model)
    model.set_z_loss(cfg.optim.z_loss)
    model = build_pipeline(model, dims, cfg) if dims.pp > 1 else parallelize(model, dims, cfg)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_lr_scheduler(optimizer, cfg.schedule)
    loader_kw = dict(vocab_size=cfg.model.vocab_size, dp_rank=dims.dp_rank, dp_size=dims.dp_size,
                     sp_rank=dims.sp_rank, sp_size=dims.sp_size)
    loader = build_loader(cfg.data, **loader_kw)
    eval_loader = build_loader(cfg.data, split="eval", **loader_kw) if cfg.schedule.eval_every else None
    return cfg, dims, model, optimizer, scheduler, loader, eval_loader


def train(cfg: Config) -> dict:
    cfg, dims, model, optimizer, scheduler, loader, eval_loader = setup(cfg)
    run_dir = start_run(cfg, dims)
    if dims.watchdog is not None:  # heartbeats that do not depend on rank 0 (which serves the store)
        dims.watchdog.share_heartbeats(run_dir / "heartbeat")
    state = TrainState()
    ckpt = Checkpointer(cfg, dims, run_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                        loader=loader, state=state)
    ckpt.maybe_resume()
    signals = SaveOnSignal(ckpt.request_save)  # SIGTERM/SIGUSR1/Ctrl-C: save, exit 85; launchers requeue
    guard = StepGuard(cfg, dims.is_main)
    faults = install_faults(model, optimizer, state, dims)  # $LONGTRAIN_FAULT; None (inert) when unset
    ledger = SampleLedger(run_dir, dims, cfg.data.batch_size) if cfg.logging.ledger else None
    sched = cfg.schedule
    looped = cfg.model.arch == "looped"
    peak, peak_src = device_peak_flops(dims.device)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * dims.dp_size * sched.grad_accum
    if dims.is_main:
        print(f"[longtrain] {dims.describe()}\n[longtrain] {describe_backends(cfg.model.attn_backend, dims.device)}"
              f"\n[longtrain] MFU is measured against {peak / 1e12:.3g} TFLOP/s per rank ({peak_src})", flush=True)
        if looped and "gdn" in cfg.model.core_attention:  # a forced fla without CUDA or fla: ConfigError
            print(f"[longtrain] {describe_gdn_kernel(cfg.model.gdn_kernel, dims.device)}", flush=True)
    log = MetricsLogger(run_dir, cfg, dims.is_main, sched.steps, state.step)
    # every eval reads the same held-out batches (the first schedule.eval_batches of the eval split):
    # evals at different steps compare, and a resumed run has no eval position to restore
    eval_set = eval_loader.state_dict() if eval_loader is not None else None
    monitor = StabilityMonitor(model, cfg.logging, dims)  # inert unless logging.stability_every > 0
    last = {}
    # a throughput window: the steps since the last log line and the time they took. A window may
    # be shorter than logging.log_every (the last of a run, the first after resuming between two
    # log steps), so its rates divide by the steps actually in it.
    t0, window_steps = time.perf_counter(), 0
    try:
        while state.step < sched.steps:
            if dims.watchdog is not None:
                dims.watchdog.step = state.step
            consumed_before = loader.consumed
            batches = [next(loader) for _ in range(sched.grad_accum)]
            n_loops = sample_loops(cfg.model, state.step, sched.seed, training=True) if looped else None
            monitor.begin(state.step)
            with dims.watch("forward_backward"):
                loss, n_tok = forward_backward(model, batches, dims, cfg, n_loops)
            monitor.after_backward()
            with dims.watch("clip_grad_norm"):
                grad_norm = clip_grad_norm_(model.parameters(), cfg.optim.grad_clip, dims)
            try:
                with dims.watch("sync(loss, grad_norm)"):  # where an NCCL hang surfaces on the host
                    loss_f, grad_norm_f = float(loss), float(grad_norm)
                accepted = guard.accept(state, loss_f, grad_norm_f)
            except RollbackRequested as e:  # optim.on_nonfinite=rollback: reload the last checkpoint
                optimizer.zero_grad(set_to_none=True)
                ckpt.rollback(str(e))
                continue
            if accepted:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if ledger is not None:
                ledger.record(state.step, consumed_before, batches, accepted, loss_f)
            state.step += 1
            state.tokens += int(n_tok)
            window_steps += 1
            if (stability := monitor.end(state.step)) is not None:
                log.log(state.step, stability)
            if state.step % cfg.logging.log_every == 0 or state.step == sched.steps:
                dt = (time.perf_counter() - t0) / window_steps
                per_tok = flops_per_token(cfg.model if n_loops is None else _with_loops(cfg.model, n_loops),
                                          cfg.data.seq_len, causal=False)
                tps = tokens_per_step / dt
                last = {"loss": float(loss), "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                        "tokens_per_s": tps, "tokens_per_s_per_rank": tps / dims.world_size,
                        "mfu": tps * per_tok / (peak * dims.world_size),
                        "mfu_causal": tps * flops_per_token(cfg.model, cfg.data.seq_len, causal=True) / (peak * dims.world_size),
                        "step_time_s": dt, "window_steps": window_steps, "tokens": state.tokens,
                        **_memory_stats(dims.device)}
                log.log(state.step, last, print_line=state.step % (10 * cfg.logging.log_every) == 0)
                t0, window_steps = time.perf_counter(), 0
            if eval_loader is not None and sched.eval_every and state.step % sched.eval_every == 0:
                eval_loader.load_state_dict(eval_set)
                with dims.watch("evaluate"):  # its forwards gather parameters (FSDP, TP) too
                    last["eval_loss"] = evaluate(model, eval_loader, dims, cfg, sched.eval_batches)
                    if cfg.eval.every_eval:  # loss by position, passkey, loop counts: <run_dir>/eval/step-N.json
                        evaluate_in_training(model, dims, cfg, state.step, run_dir)
                log.log(state.step, {"eval_loss": last["eval_loss"]}, print_line=True)
            ckpt.after_step()
        ckpt.finish()
    finally:  # also on an error or a requested exit: no handler or hook outlives the run
        signals.restore()
        log.close()
        _close_hooks(ledger, faults, dims)
    return {"step": state.step, "tokens": state.tokens, "run_dir": str(run_dir), **last}


def _close_hooks(ledger, faults, dims) -> None:
    if ledger is not None:
        ledger.close()
    if faults is not None:
        faults.remove()
    if dims.watchdog is not None:
        dims.watchdog.stop()


def _with_loops(mcfg, n_loops: int):
    return dataclasses.replace(mcfg, loops=n_loops)


def _memory_stats(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {"peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "alloc_retries": torch.cuda.memory_stats(device).get("num_alloc_retries", 0)}
