"""The one typed configuration tree of longtrain.

Owns: the dataclasses for every section (model, parallel, memory, data, optim, schedule,
checkpoint, logging, eval, launch), loading them from YAML files, applying ``section.key=value``
overrides from the command line, and checking every key and value with an error that names the
key, what was given, what is allowed and -- for a typo -- the nearest valid key.

The idea: a config key that silently becomes a default is a bug, so unknown keys are rejected,
values are coerced to the declared type (or refused), and ``Literal`` fields only take their
listed values. Cross-field checks that need the world size (mesh sizes, divisibility) live with
the code that knows it (``longtrain.parallel.mesh``), but read only this tree.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

import longtrain.configs as _packaged_configs_pkg  # the shipped YAMLs (package data of an installed wheel)
from longtrain.errors import UserError


class ConfigError(UserError, ValueError):
    """A user-facing configuration problem; the message says what to change."""

    kind = "config"


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class RopeScalingConfig:
    """Rotary-embedding scaling used for context extension (Hugging Face names)."""

    type: Literal["none", "linear", "dynamic", "yarn", "llama3"] = "none"
    factor: float = 1.0
    original_max_position: int = 8192
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: Optional[float] = None  # yarn; None = 0.1 * ln(factor) + 1


@dataclass
class ModelConfig:
    """Shape of the network. ``arch`` picks the Llama decoder or the looped transformer."""

    arch: Literal["llama", "looped"] = "looped"
    vocab_size: int = 264
    dim: int = 128
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 352
    n_layers: int = 4  # llama only
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    max_seq_len: int = 131072
    tie_embeddings: bool = False
    init_std: float = 0.02
    attn_backend: Literal["auto", "sdpa", "sdpa_cudnn", "sdpa_flash", "sdpa_math", "flex", "flash_attn"] = "auto"
    # looped transformer: prelude -> core x loops -> coda
    n_prelude: int = 1
    n_core: int = 2
    n_coda: int = 1
    loops: int = 4  # mean loop count in training; the fixed count at evaluation
    loop_sampling: Literal["fixed", "uniform", "poisson"] = "fixed"
    loops_max: int = 8  # upper bound for sampled loop counts (and per-loop LoRA tables)
    backprop_loops: int = 0  # truncated backprop: only the last B iterations build a graph; 0 = all
    lora_rank: int = 0  # per-loop LoRA on the core's projections; 0 = off
    lora_alpha: float = 16.0
    reinject: Literal["none", "add", "concat"] = "add"
    # [[step, loops], ...]: the training loop count from each step on (growing depth); [] = model.loops
    loop_schedule: list = field(default_factory=list)
    core_attention: list = field(default_factory=list)  # per core layer "full" or "gdn"; [] = all full
    gdn_kernel: Literal["auto", "fla", "reference"] = "auto"  # auto: fla on CUDA when installed
    hyper_streams: int = 1  # residual streams mixed after each loop iteration (Hyperloop); 1 = off
    # stability options (issue 23), off by default: they change the numerics
    norm_placement: Literal["pre", "peri"] = "pre"  # peri: also a norm on each sublayer's output, inside the residual branch
    qk_norm: bool = False  # RMSNorm per head on queries and keys, before rotary (Qwen3's attention); gdn core
    # layers have none: their core already L2-normalises q and k per head (models.linear_attention)
    loop_norm: bool = False  # looped models: RMSNorm on the core's output after every iteration
    sigma_reparam: bool = False  # σReparam: each block linear computes with gamma / sigma(W) * W (models/sigma_reparam.py)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_unrolled_layers(self) -> int:
        """Transformer blocks executed per forward pass (effective depth)."""
        if self.arch == "llama":
            return self.n_layers
        return self.n_prelude + self.n_core * self.loops + self.n_coda


@dataclass
class ParallelConfig:
    """Sizes of the device-mesh dimensions; their product must equal the world size."""

    dp_replicate: int = 1
    dp_shard: int = -1  # -1: whatever is left of the world size
    tp: int = 1
    sp: int = 1  # Ulysses sequence parallel
    pp: int = 1
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"] = "1f1b"
    pp_microbatches: int = 0  # 0: 2 * pp
    pp_virtual_stages: int = 2  # stages per rank for interleaved schedules
    pp_boundaries: Optional[list] = None  # virtual-layer index where each stage after the first starts
    param_dtype: Literal["auto", "bf16", "fp32"] = "auto"  # FSDP2 compute dtype (one process too); auto = schedule.dtype
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    init_timeout_s: float = 600.0
    timeout_s: float = 300.0  # collective timeout during training


@dataclass
class MemoryConfig:
    """Activation and optimizer memory policy (see ``longtrain.memory``).

    ``recompute`` is the default mode of every transformer block; ``recompute_layers`` overrides
    it per group with entries ``"SELECTOR:MODE"``, where SELECTOR is a block index (``"3"``), an
    inclusive range (``"0-7"``) or a module path prefix (``"prelude"``, ``"core"``, ``"coda"``,
    ``"layers"``) and MODE one of none/full/selective. Block indices are the keys of
    ``model.layers`` for Llama and prelude, core, coda in order for the looped model.
    """

    policy: Literal["manual", "auto"] = "manual"
    recompute: Literal["none", "full", "selective"] = "none"
    recompute_layers: list = field(default_factory=list)  # ["0-7:full", "core:selective", ...]
    selective_save: Literal["attention", "attention+half_mm", "attention+mm"] = "attention"
    recompute_loops: bool = False  # looped models: store only each iteration's input
    offload: bool = False  # offload what recompute keeps (layer inputs) to pinned CPU memory
    offload_fraction: float = 1.0  # token-wise split: fraction of each saved tensor sent to CPU
    offload_prefetch: int = 1  # blocks whose offloaded tensors come back ahead of need in backward
    host_budget_gb: float = 64.0  # pinned host memory per rank (offload pool + optimizer offload)
    tiled_mlp: int = 0  # number of sequence chunks for the MLP; 0 = off
    tiled_loss: int = 0  # tokens per chunk for head + cross-entropy; 0 = off
    optimizer_offload: bool = False
    optimizer_offload_impl: Literal["auto", "deepspeed", "torch"] = "auto"
    fsdp_cpu_offload: bool = False
    gpu_budget_gb: float = 0.0  # planner budget; 0 = the device's memory


RECOMPUTE_MODES = ("none", "full", "selective")


def check_recompute_layers(entries: list) -> list[tuple[str, str]]:
    """Parse ``memory.recompute_layers`` into (selector, mode) pairs or raise ConfigError."""
    out = []
    for e in entries:
        if not isinstance(e, str) or e.count(":") != 1:
            raise ConfigError(f"memory.recompute_layers entry {e!r} must look like 'SELECTOR:MODE', "
                              f"e.g. '0-7:full', '12:selective' or 'core:none'.")
        sel, mode = (x.strip() for x in e.split(":"))
        if mode not in RECOMPUTE_MODES:
            raise ConfigError(f"memory.recompute_layers entry {e!r}: mode {mode!r} is not one of "
                              f"{list(RECOMPUTE_MODES)}.")
        if not sel:
            raise ConfigError(f"memory.recompute_layers entry {e!r} has an empty selector.")
        if sel[0].isdigit():
            parts = sel.split("-")
            if len(parts) > 2 or not all(p.isdigit() for p in parts) or int(parts[0]) > int(parts[-1]):
                raise ConfigError(f"memory.recompute_layers entry {e!r}: selector {sel!r} must be a "
                                  f"block index or an increasing range like '0-7'.")
        out.append((sel, mode))
    return out


@dataclass
class DataConfig:
    """Where tokens come from and how they are packed into sequences."""

    source: Literal["stdlib", "synthetic", "shards", "megatron"] = "stdlib"
    path: str = ""  # shard directory (manifest.json) or Megatron prefix
    seq_len: int = 256
    batch_size: int = 8  # sequences per data-parallel rank per micro-step
    packing: Literal["greedy", "best_fit"] = "greedy"
    split_long: Literal["split", "truncate", "drop"] = "split"
    doc_masking: bool = True  # block-diagonal attention + per-document positions
    seed: int = 1234
    eval_fraction: float = 0.02  # documents held out for the eval loss
    tokenizer: str = "byte"  # "byte" or a path to a Hugging Face tokenizer.json
    on_bad_document: Literal["error", "skip"] = "error"
    pack_window: int = 4096  # documents packed together; the shuffle/packing unit of an epoch
    length_weighting: float = 0.0  # train epochs hold a document ~(length / mean length)^p times; 0 = once each
    verify_checksums: bool = True  # sha256 every shard when opened (sizes are always checked)
    # a resumed run whose order settings (seq_len, seed, packing, dataset) differ from the checkpoint's:
    # error, or continue at the same global sample count in the new order (context extension)
    on_order_change: Literal["error", "continue"] = "error"
    stdlib_mb: float = 4.0  # source=stdlib: MB of standard-library source to train on
    synthetic_docs: int = 4096  # source=synthetic: number of random documents
    synthetic_doc_len: int = 512  # source=synthetic: mean document length in tokens
    # source=synthetic: 0 = uniform random tokens; P > 0 = each document repeats its first P random
    # tokens, so the rest is predictable only through attention (the LR sweep's learnable proxy task)
    synthetic_period: int = 0


@dataclass
class OptimConfig:
    lr: float = 3e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = off
    on_nonfinite: Literal["skip", "stop", "rollback"] = "skip"
    spike_factor: float = 0.0  # skip a step whose loss exceeds this times the running mean; 0 = off
    z_loss: float = 0.0  # adds z_loss * logsumexp(logits)^2 per token to the training loss (e.g. 1e-4); 0 = off


@dataclass
class ScheduleConfig:
    steps: int = 200
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    grad_accum: int = 1
    eval_every: int = 100  # 0 = never
    eval_batches: int = 4  # a fixed held-out set: the eval split's first eval_batches batches, at every eval
    seed: int = 0
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # autocast; auto = bf16 where supported (GPU)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False


@dataclass
class CheckpointConfig:
    """Sharded checkpoints (``longtrain.trainer.checkpoint``) and Hugging Face import.

    Saves go to ``<dir>/step-N/`` (written as ``step-N.tmp/``, renamed when complete, then named
    in ``<dir>/latest``). ``resume``: ``auto`` = the newest complete checkpoint in ``dir`` (a
    damaged one is skipped with a warning), ``none`` = start fresh, or a path to a step
    directory / checkpoint directory (an error if it cannot be used).
    """

    dir: str = ""  # "" = <run_dir>/checkpoints
    every_steps: int = 0  # 0 = only at the end / on signal
    every_seconds: float = 0.0  # also save when this long has passed since the last save; 0 = off
    keep_last: int = 2
    keep_every: int = 0  # additionally keep every K-th step; 0 = off
    resume: str = "auto"  # auto | none | path to a step directory
    async_save: bool = True  # write in a background thread while training continues
    # async saves first copy the state off the GPU: "blocking" (pageable copies before save()
    # returns, the measured default) or "background" (a reused pinned buffer, filled by a thread
    # while the next forward/backward runs; the next optimizer step waits for it)
    staging: Literal["blocking", "background"] = "blocking"
    save_final: bool = True
    init_from_hf: str = ""  # local HF Llama/Qwen3/Gemma 2/3 directory (config.json + safetensors); used when not resuming
    on_save_error: Literal["continue", "stop"] = "continue"
    max_rollbacks: int = 3  # optim.on_nonfinite=rollback: reloads of one checkpoint before giving up


@dataclass
class StabilityConfig:
    """What the instability monitors sample and when they warn (``trainer/stability.py``)."""

    queries: int = 64  # queries per sequence (the last block) whose attention rows are measured
    tokens: int = 64  # tokens per sequence (the last ones) whose output logits are measured
    entropy_min: float = 0.05  # warn when a layer's mean attention entropy (nats) falls below this
    attn_logit_max: float = 50.0  # warn when a layer's largest attention logit exceeds this
    output_logit_max: float = 100.0  # warn when the largest output logit exceeds this
    logz_drift_max: float = 5.0  # warn when mean log Z moved more than this since the first measurement


@dataclass
class LoggingConfig:
    run_dir: str = "runs/{name}"
    name: str = "default"
    log_every: int = 10
    progress: bool = True
    tensorboard: bool = True
    jsonl: bool = True
    ledger: bool = False  # per-rank <run_dir>/ledger/rank<R>.jsonl: each step's global samples and batch digest
    stability_every: int = 0  # instability monitors every N steps (attention, logits, RMS, updates); 0 = off
    stability: StabilityConfig = field(default_factory=StabilityConfig)


@dataclass
class EvalConfig:
    """``longtrain eval``: loss by position, passkey retrieval, loss against loop count (trainer/evaluate.py)."""

    batches: int = 4  # held-out global batches for the loss by position and by loop count
    passkey_lengths: list = field(default_factory=list)  # tokens; [] = data.seq_len / 8, / 4, / 2, / 1
    passkey_depths: list = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])  # where the key sits
    passkey_trials: int = 4  # keys per (length, depth) cell
    loops: list = field(default_factory=list)  # looped models; [] = 1 .. model.loops_max + loops_past
    loops_past: int = 2  # loop counts past model.loops_max (only where model.lora_rank=0)
    every_eval: bool = False  # also run it (no loops past loops_max) at every schedule.eval_every step
    plots: bool = True  # PNG plots next to the JSON (needs matplotlib: pip install 'longtrain[plots]')


@dataclass
class RayConfig:
    """``launch.backend=ray``: one actor per worker in a placement group (see launch/ray_backend.py)."""

    address: str = ""  # "" = start a local cluster in this process; "auto" or ray://host:10001 = connect
    num_cpus: int = 0  # CPUs of a local cluster; 0 = this machine's (only when address is "")
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    placement_timeout_s: float = 120.0  # how long to wait for the bundles before giving up


@dataclass
class SlurmConfig:
    """``launch.backend=slurm``: the sbatch script ``longtrain launch`` writes (see launch/slurm.py)."""

    partition: str = ""
    account: str = ""
    qos: str = ""
    time: str = "01:00:00"
    gpus_per_node: int = 0  # 0 = CPU job: launch.nproc_per_node tasks per node, one per CPU slot
    cpus_per_task: int = 1
    mem: str = ""  # e.g. 200G; "" = the partition's default
    signal_seconds: int = 120  # --signal=B:USR1@N: checkpoint and requeue this long before the limit
    requeue: bool = True  # requeue the job itself after a checkpoint on USR1 (preemption, time limit)
    extra_sbatch: list = field(default_factory=list)  # more #SBATCH lines, e.g. ["--constraint=h100"]
    setup: list = field(default_factory=list)  # shell lines run before srun (module load, venv activation)
    python: str = ""  # the interpreter on the nodes; "" = the one running `longtrain launch`
    job_name: str = "longtrain"
    output: str = ""  # sbatch --output; "" = <run_dir>/slurm-%j.out


@dataclass
class LaunchConfig:
    """How ``longtrain launch`` starts the workers; every worker runs ``launch.entry(cfg)``."""

    backend: Literal["local", "ray", "slurm"] = "local"
    nodes: int = 1
    nproc_per_node: int = 1  # workers per node: one per GPU, or per CPU slot on a CPU machine
    max_restarts: int = 0  # restart the whole group (from the newest checkpoint) this many times
    entry: str = "longtrain.trainer.train:train"  # the function each worker calls with the config
    master_port: int = 0  # local: rendezvous port; 0 = a free one
    ray: RayConfig = field(default_factory=RayConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.logging.run_dir.format(name=self.logging.name))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------
# Value checks that need no world size
# --------------------------------------------------------------------------------------------

_POSITIVE = {
    "model.vocab_size", "model.dim", "model.n_heads", "model.n_kv_heads", "model.ffn_dim",
    "model.n_layers", "model.max_seq_len", "model.loops", "model.loops_max", "data.seq_len",
    "data.batch_size", "optim.lr", "schedule.grad_accum", "parallel.dp_replicate", "parallel.tp",
    "parallel.sp", "parallel.pp", "parallel.pp_virtual_stages", "checkpoint.keep_last",
    "launch.nodes", "launch.nproc_per_node", "launch.slurm.cpus_per_task", "parallel.timeout_s", "parallel.init_timeout_s",
    "memory.host_budget_gb", "eval.batches", "eval.passkey_trials", "logging.stability.queries",
    "logging.stability.tokens",
}
_NON_NEGATIVE = {
    "model.n_prelude", "model.n_coda", "model.backprop_loops", "model.lora_rank",
    "optim.weight_decay", "optim.grad_clip", "schedule.steps", "schedule.warmup_steps",
    "schedule.eval_every", "memory.tiled_mlp", "memory.tiled_loss", "memory.offload_prefetch", "checkpoint.every_steps",
    "checkpoint.keep_every", "checkpoint.every_seconds", "checkpoint.max_rollbacks", "launch.max_restarts", "launch.master_port", "launch.ray.num_cpus",
    "launch.ray.cpus_per_worker", "launch.ray.gpus_per_worker", "launch.slurm.gpus_per_node",
    "launch.slurm.signal_seconds", "optim.spike_factor", "memory.gpu_budget_gb", "eval.loops_past",
    "data.length_weighting", "optim.z_loss", "logging.stability_every", "data.synthetic_period",
}


def _check_looped_variants(m: ModelConfig, pp: int) -> None:
    """Growing depth, the core's mixer per layer and hyper-connected streams."""
    if m.hyper_streams < 1:
        raise ConfigError(f"model.hyper_streams={m.hyper_streams} must be >= 1 (1 = one residual stream, off).")
    if m.core_attention and (len(m.core_attention) != m.n_core
                             or not set(m.core_attention) <= {"full", "gdn"}):
        raise ConfigError(f"model.core_attention={m.core_attention} must list 'full' or 'gdn' for each of the "
                          f"model.n_core={m.n_core} core layers, e.g. {(['full'] + ['gdn'] * 3)[:m.n_core]}, or be [].")
    if not m.loop_schedule:
        return
    ok = all(isinstance(e, list) and len(e) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in e)
             for e in m.loop_schedule)
    steps = [e[0] for e in m.loop_schedule] if ok else []
    if not ok or steps[0] != 0 or any(b <= a for a, b in zip(steps, steps[1:])) \
            or not all(1 <= e[1] <= m.loops_max for e in m.loop_schedule):
        raise ConfigError(f"model.loop_schedule={m.loop_schedule} must be [[step, loops], ...] with steps rising from "
                          f"0 and loops in [1, model.loops_max={m.loops_max}], e.g. [[0, 1], [2000, 2], [6000, 4]].")
    if m.loop_sampling == "uniform":
        raise ConfigError("model.loop_schedule with model.loop_sampling=uniform: uniform draws up to loops_max "
                          "whatever the scheduled count; use loop_sampling=fixed (the scheduled count) or "
                          "poisson (drawn around it).")
    if pp > 1:
        raise ConfigError(f"model.loop_schedule with parallel.pp={pp}: pipeline stages are cut for one fixed loop "
                          f"count; drop the schedule or set parallel.pp=1.")


def _divisors(n: int) -> str:
    return "{" + ", ".join(str(d) for d in range(1, n + 1) if n % d == 0) + "}"


def validate(cfg: Config) -> Config:
    """Checks of single values and of relations inside the tree; raises ConfigError."""
    for key in sorted(_POSITIVE | _NON_NEGATIVE):
        value = cfg
        for name in key.split("."):  # nested sections: launch.slurm.cpus_per_task
            value = getattr(value, name)
        if key in _POSITIVE and not value > 0:
            raise ConfigError(f"{key}={value!r} must be > 0; set a positive value.")
        if key in _NON_NEGATIVE and value < 0:
            raise ConfigError(f"{key}={value!r} must be >= 0; set 0 to turn it off or a positive value.")
    m = cfg.model
    if m.dim % m.n_heads:
        raise ConfigError(f"model.dim={m.dim} is not divisible by model.n_heads={m.n_heads}; "
                          f"pick n_heads among the divisors of dim.")
    if m.head_dim % 2:
        raise ConfigError(f"model.dim/model.n_heads={m.dim}/{m.n_heads}={m.head_dim} must be even for rotary "
                          f"embeddings; choose model.dim and model.n_heads so that dim / n_heads is even.")
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.n_kv_heads}; "
                          f"grouped-query attention needs n_kv_heads to divide n_heads; use n_kv_heads in "
                          f"{_divisors(m.n_heads)}.")
    if m.arch == "looped":
        if m.n_core < 1:
            raise ConfigError(f"model.n_core={m.n_core} must be >= 1 for arch=looped; set model.n_core=1 or more, "
                              f"or model.arch=llama for a model without a looped core.")
        if m.loops > m.loops_max:
            raise ConfigError(f"model.loops={m.loops} exceeds model.loops_max={m.loops_max}; raise loops_max.")
        if m.backprop_loops > m.loops_max:
            raise ConfigError(f"model.backprop_loops={m.backprop_loops} exceeds model.loops_max={m.loops_max}.")
        _check_looped_variants(m, cfg.parallel.pp)
    elif m.loop_schedule or m.core_attention or m.hyper_streams != 1:
        raise ConfigError("model.loop_schedule, model.core_attention and model.hyper_streams apply to the looped "
                          "core; set model.arch=looped or leave them at their defaults ([], [], 1).")
    elif m.loop_norm:
        raise ConfigError("model.loop_norm=true normalises a looped core's output; it needs model.arch=looped "
                          "(use model.norm_placement=peri for a Llama).")
    if m.sigma_reparam and cfg.checkpoint.init_from_hf:
        raise ConfigError("model.sigma_reparam=true with checkpoint.init_from_hf: a Hugging Face checkpoint has no "
                          "gamma, u, v for its linears; train from scratch with sigma_reparam, or set "
                          "model.sigma_reparam=false to fine-tune it.")
    if not 0.0 <= cfg.memory.offload_fraction <= 1.0:
        raise ConfigError(f"memory.offload_fraction={cfg.memory.offload_fraction} must be in [0, 1]: the share of "
                          f"each saved tensor sent to the CPU; set a value between 0 and 1.")
    check_recompute_layers(cfg.memory.recompute_layers)
    if cfg.memory.optimizer_offload and cfg.memory.fsdp_cpu_offload:
        raise ConfigError("memory.optimizer_offload=true and memory.fsdp_cpu_offload=true both move the "
                          "optimizer to the CPU; set only one (fsdp_cpu_offload also offloads parameters "
                          "and gradients).")
    if not 0.0 <= cfg.data.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction={cfg.data.eval_fraction} must be in [0, 1): the share of documents "
                          f"held out for the eval loss; set e.g. 0.02, or 0 (with schedule.eval_every=0) for none.")
    for key in ("pack_window", "synthetic_docs", "synthetic_doc_len", "stdlib_mb"):
        if not getattr(cfg.data, key) > 0:
            raise ConfigError(f"data.{key}={getattr(cfg.data, key)!r} must be > 0; set a positive value.")
    if cfg.data.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}; "
                          f"raise model.max_seq_len or shorten data.seq_len.")
    if not 0.0 < cfg.optim.beta1 < 1.0 or not 0.0 < cfg.optim.beta2 < 1.0:
        raise ConfigError(f"optim.beta1={cfg.optim.beta1} and optim.beta2={cfg.optim.beta2} must be in (0, 1); "
                          f"the usual values are optim.beta1=0.9 optim.beta2=0.95.")
    if cfg.schedule.warmup_steps > cfg.schedule.steps:
        raise ConfigError(f"schedule.warmup_steps={cfg.schedule.warmup_steps} exceeds "
                          f"schedule.steps={cfg.schedule.steps}; shorten the warmup.")
    if cfg.eval.every_eval and (cfg.parallel.pp > 1 or not cfg.schedule.eval_every):
        raise ConfigError(f"eval.every_eval=true needs schedule.eval_every > 0 and parallel.pp=1 (got "
                          f"{cfg.schedule.eval_every} and {cfg.parallel.pp}); evaluate a pipeline run's checkpoints "
                          f"with `longtrain eval RUN_DIR parallel.pp=1` instead.")
    if cfg.launch.master_port > 65535:
        raise ConfigError(f"launch.master_port={cfg.launch.master_port} is not a TCP port; use one in 1-65535, "
                          f"or 0 for a free one.")
    if cfg.data.source in ("shards", "megatron") and not cfg.data.path:
        raise ConfigError(f"data.source={cfg.data.source} needs data.path; point it at the prepared "
                          f"dataset (see `longtrain data prepare`).")
    return cfg


# --------------------------------------------------------------------------------------------
# Loading: YAML + overrides, strictly typed
# --------------------------------------------------------------------------------------------

_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def _packaged_configs() -> list[Path]:
    dirs = [_CONFIG_DIR, *(Path(p) for p in _packaged_configs_pkg.__path__)]
    return [d for d in dirs if d.is_dir()]


def resolve_config_path(name: str) -> Path:
    """A YAML path, or the name of a shipped config (``llama3-8b`` -> configs/llama3-8b.yaml)."""
    p = Path(name)
    if p.is_file():
        return p
    for d in _packaged_configs():
        for cand in (d / name, d / f"{name}.yaml"):
            if cand.is_file():
                return cand
    shipped = sorted({q.stem for d in _packaged_configs() for q in d.glob("*.yaml")})
    raise ConfigError(f"config file {name!r} not found; give a path to a YAML file or one of the "
                      f"shipped configs: {', '.join(shipped) or '(none)'}.")


def _suggest(word: str, options: list[str]) -> str:
    # a key that starts like a valid one is the likelier intent (launch.nprocs -> nproc_per_node, not
    # the letter-wise closer nodes); otherwise the closest spelling
    near = [o for o in options if len(word) >= 4 and o[:4] == word[:4] and o != word]
    near = near[:1] or difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f" Did you mean {near[0]!r}?" if near else ""


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` (from YAML or a CLI string) to the declared type ``tp`` or raise."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of {list(args)}."
                              + (_suggest(str(value), [str(a) for a in args])))
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}={value!r} must be a boolean; write {key}=true or {key}=false.")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be an integer; write a whole number, e.g. {key}=8.")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} must be an integer; write a whole number, e.g. {key}=8.")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be a number; write e.g. {key}=0.5 or {key}=1e-3.")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} must be a number; write e.g. {key}=0.5 or {key}=1e-3.")
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}={value!r} must be a string; quote it, e.g. {key}='...'.")
        return str(value)
    if tp is list or origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if value is None:
            return []
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} must be a list, e.g. [1, 2].")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - a bug in this file


def _apply(obj: Any, data: dict, prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"unknown config key {key!r}.{_suggest(k, names)} "
                              f"Valid keys under {prefix.rstrip('.') or 'the top level'}: {', '.join(names)}.")
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            if not isinstance(v, dict):
                raise ConfigError(f"{key} is a section; give it as a mapping, e.g. {key}.<field>=<value>.")
            _apply(getattr(obj, k), v, key + ".")
        else:
            setattr(obj, k, _coerce(key, v, tp))


def _nest(dotted: str, value: Any) -> dict:
    out: dict = {}
    cur = out
    parts = dotted.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. optim.lr=1e-3).")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has no key; write section.key=value.")
    # YAML parsing gives numbers/bools/lists; strings stay strings.
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, (dict,)):
        value = raw
    return key, value


def load_config(path: Optional[str | os.PathLike] = None, overrides: Optional[list[str]] = None) -> Config:
    """Defaults <- YAML file (optional) <- ``section.key=value`` overrides, then validate."""
    cfg = Config()
    if path is not None:
        p = resolve_config_path(str(path))
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections, got {type(data).__name__}; write "
                              f"one block per section, e.g. a line 'optim:' followed by '  lr: 1e-3'.")
        _apply(cfg, data, "")
    for ov in overrides or []:
        key, value = parse_override(ov)
        _apply(cfg, _nest(key, value), "")
    return validate(cfg)


def config_from_dict(data: dict) -> Config:
    """Rebuild a config saved with a run or checkpoint (``Config.to_dict``)."""
    cfg = Config()
    _apply(cfg, data, "")
    return validate(cfg)
