"""The same measurement as bench_train.py, for torchtitan 0.2.2 (the release for torch 2.11).

    torchrun --nproc_per_node=2 bench/torchtitan_baseline.py --config llama3-8b --seq-len 131072 \
        --steps 5 --warmup 2 --out titan.json

torchtitan's own ``Trainer`` and its own Llama-3 (``torchtitan.models.llama3``: ``Transformer``,
``parallelize_llama``, the fused AdamW of ``build_optimizers``, the cross-entropy of
``build_cross_entropy_loss``), configured through its own ``ConfigManager`` (the same CLI as
``torchtitan.train``) at its strongest setting that fits 128K-256K on 2 H200:

- context parallelism ``--parallelism.context_parallel_degree`` = ``--cp`` (default: the world size):
  ring attention over SDPA (torchtitan's kernel priority cuDNN > flash > math), head-tail load
  balancing, sequence sharded by torchtitan's ``prepare_context_parallel_input``;
- FSDP2 over the remaining ranks and CP (``data_parallel_shard_degree=-1``: torchtitan shards over
  dp_shard x cp, both GPUs at cp=2);
- full activation checkpointing (``--ac``; selective does not fit at 128K);
- the loss compiled (``compile.components=["loss"]``, ``--compile-loss``; without it the fp32
  logits do not fit), the model not compiled;
- fp32 master weights (``training.dtype=float32``), bf16 parameters in compute, fp32 reductions;
- random init (``init_weights``), no checkpoint, no tokenizer, no hub: a TrainSpec registered here
  (``longtrain_bench_llama3``) is torchtitan's llama3 spec with the model shape of our config
  (``model.*``: dim, layers, heads, kv heads, ffn, vocab, rope theta, norm eps) and a synthetic
  dataloader of random tokens (the same for every CP rank of a data-parallel group).

Steps are torchtitan's ``Trainer.train_step`` (zero_grad, forward + loss + backward under its
train context, clip, optimizer, lr scheduler), timed here with the device synchronised, as in the
other scripts; torchtitan's own metrics logging is off (it resets the peak-memory counters).

Writes the JSON schema of bench/common.py (``system: "torchtitan"``), rewritten after every phase;
OOM -> ``status: "OOM"`` and exit code 3. ``--device cpu --tiny`` runs the path on a CPU (one
process, gloo, no CP/FSDP) to check the plumbing, not the speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", category=FutureWarning)

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # torchtitan's run_train.sh too

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))
_BENCH = Path(__file__).resolve().parent
if str(_BENCH) not in sys.path:
    sys.path.insert(0, str(_BENCH))

import common  # noqa: E402
from bench_train import TINY_MODEL, parse_seq_len  # noqa: E402

SPEC_NAME = "longtrain_bench_llama3"
FLAVOR = "bench"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="llama3-8b", help="shipped longtrain config whose model.* shape to build")
    p.add_argument("--seq-len", type=parse_seq_len, default=None, help="tokens per sequence (global)")
    p.add_argument("--cp", type=int, default=0, help="context-parallel degree; 0 = the world size")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first compiles the loss)")
    p.add_argument("--out", default=None)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--tiny", action="store_true", help="tiny shape and sequence (CPU plumbing check)")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--trace-dir", default=None)
    p.add_argument("--no-kernel-rates", action="store_true", help="skip the matmul/attention microbenchmarks")
    p.add_argument("--ac", choices=["full", "selective", "none"], default="full",
                   help="activation checkpointing (torchtitan's activation_checkpoint.mode)")
    p.add_argument("--compile-loss", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile the loss (compile.components=[loss]); the model is not compiled")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--dump-folder", default=None, help="torchtitan's job.dump_folder (default: a temp dir)")
    p.add_argument("--titan-arg", action="append", default=[],
                   help="one more torchtitan CLI argument, e.g. --titan-arg=--parallelism.context_parallel_rotate_method=alltoall")
    common.add_gpu_cap_arg(p)
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the longtrain config (model.* matter)")
    return p


# --------------------------------------------------------------------------------------------
# torchtitan configuration
# --------------------------------------------------------------------------------------------


def load_model_config(args):
    from longtrain.config import load_config

    ov = list(TINY_MODEL) if args.tiny else []
    ov += [o for o in args.overrides if o.startswith("model.")]
    cfg = load_config(args.config, ov + [f"model.max_seq_len={2**31 - 1}"])
    seq = args.seq_len if args.seq_len is not None else (256 if args.tiny else cfg.data.seq_len)
    return cfg.model, seq


def ffn_args(dim: int, ffn_dim: int) -> dict:
    """``multiple_of`` / ``ffn_dim_multiplier`` that make torchtitan's FeedForward (hidden =
    int(2 * 4 * dim / 3), times the multiplier, rounded up to ``multiple_of``) exactly ``ffn_dim``."""
    base = int(2 * 4 * dim / 3)
    if base <= ffn_dim:
        return {"multiple_of": ffn_dim, "ffn_dim_multiplier": None}
    return {"multiple_of": ffn_dim, "ffn_dim_multiplier": ffn_dim / base}


def titan_model_args(m, seq_len: int):
    """torchtitan ``TransformerModelArgs`` of the shape of our ``ModelConfig``."""
    from torchtitan.models.llama3 import TransformerModelArgs

    if m.arch != "llama":
        raise SystemExit(f"--config: model.arch={m.arch}; the torchtitan baseline builds plain Llama models only")
    if m.dim // m.n_heads != m.head_dim:
        raise SystemExit(f"model.head_dim={m.head_dim} != dim/n_heads={m.dim // m.n_heads}: torchtitan's "
                         f"Llama derives head_dim from dim and n_heads")
    return TransformerModelArgs(dim=m.dim, n_layers=m.n_layers, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads,
                                vocab_size=m.vocab_size, norm_eps=m.norm_eps, rope_theta=m.rope_theta,
                                max_seq_len=seq_len, **ffn_args(m.dim, m.ffn_dim))


def titan_cli(args, seq_len: int, cp: int, steps: int, dump_folder: str) -> list:
    """The torchtitan command line (``ConfigManager.parse_args``) of this run."""
    cli = [
        "--model.name", SPEC_NAME, "--model.flavor", FLAVOR, "--model.hf_assets_path", dump_folder,
        "--job.dump_folder", dump_folder,
        "--training.seq_len", str(seq_len), "--training.local_batch_size", "1",
        "--training.steps", str(steps), "--training.dtype", "float32",
        "--training.mixed_precision_param", "bfloat16", "--training.mixed_precision_reduce", "float32",
        "--parallelism.data_parallel_shard_degree", "-1", "--parallelism.context_parallel_degree", str(cp),
        "--activation_checkpoint.mode", args.ac,
        "--optimizer.name", "AdamW", "--optimizer.lr", str(args.lr), "--optimizer.implementation", "fused",
        "--lr_scheduler.warmup_steps", "0",
        "--metrics.log_freq", "1000000", "--checkpoint.no-enable",
        # step 1 compiles the loss; a 256K step takes ~90 s: generous timeouts so a slow rank is no error
        "--comm.init_timeout_seconds", "1800", "--comm.train_timeout_seconds", "1800",
    ]
    if args.compile_loss:
        cli += ["--compile.enable", "--compile.components", "loss"]
    else:
        cli += ["--compile.no-enable"]
    return cli + list(args.titan_arg)


class SyntheticTokens:
    """Random tokens, ``({"input": x[:, :-1]}, x[:, 1:])`` per batch like torchtitan's text datasets;
    seeded by (batch index, data-parallel rank), so every CP rank of a group sees the same sequence
    (torchtitan then shards it over CP). Made a ``BaseDataLoader`` by ``make_dataloader_class``."""

    def __init__(self, vocab: int, seq_len: int, batch: int, dp_rank: int):
        self.vocab, self.seq_len, self.batch, self.dp_rank = vocab, seq_len, batch, dp_rank
        self.index = 0

    def __iter__(self):
        import torch

        while True:
            g = torch.Generator().manual_seed(1_000_003 * self.index + self.dp_rank)
            x = torch.randint(0, self.vocab, (self.batch, self.seq_len + 1), generator=g)
            self.index += 1
            yield {"input": x[:, :-1].contiguous()}, x[:, 1:].contiguous()

    def state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, state_dict):
        self.index = state_dict["index"]


def guard_datasets_import() -> str | None:
    """torchtitan's llama3 package imports Hugging Face ``datasets`` for its text loaders, which this
    benchmark never uses (``SyntheticTokens`` replaces them). If the carried ``datasets`` cannot be
    imported beside the machine's pyarrow / huggingface_hub, stand in a module whose loaders raise,
    so torchtitan itself still imports; returns why, for the record."""
    try:
        import datasets  # noqa: F401
        import datasets.distributed  # noqa: F401
        return None
    except Exception as e:  # noqa: BLE001 - any import failure of an unused dependency
        import types

        reason = common.short_error(e, 300)

        def unavailable(*a, **k):
            raise RuntimeError(f"Hugging Face datasets could not be imported ({reason}); the benchmark uses "
                               f"synthetic tokens only")

        stub = types.ModuleType("datasets")
        stub.Dataset = stub.IterableDataset = type("Dataset", (), {})
        stub.load_dataset = unavailable
        dist = types.ModuleType("datasets.distributed")
        dist.split_dataset_by_node = unavailable
        stub.distributed = dist
        sys.modules["datasets"], sys.modules["datasets.distributed"] = stub, dist
        return f"datasets not importable ({reason}); a stand-in module lets torchtitan import (it is never used)"


def make_dataloader_class():
    from torchtitan.components.dataloader import BaseDataLoader

    return type("SyntheticTokensLoader", (SyntheticTokens, BaseDataLoader), {})


def register_spec(model_args) -> None:
    """torchtitan's llama3 TrainSpec with our shape as its only flavor, the synthetic loader and no
    tokenizer, validator or HF state-dict adapter (nothing that reads files or the network)."""
    from torchtitan.models import llama3
    from torchtitan.protocols import train_spec as ts

    loader_cls = make_dataloader_class()

    def build_dataloader(dp_world_size, dp_rank, tokenizer, job_config, **kwargs):
        t = job_config.training
        return loader_cls(model_args.vocab_size, t.seq_len, t.local_batch_size, dp_rank)

    spec = dataclasses.replace(llama3.get_train_spec(), model_args={FLAVOR: model_args},
                               build_dataloader_fn=build_dataloader, build_tokenizer_fn=None,
                               build_validator_fn=None, state_dict_adapter=None)
    if SPEC_NAME not in ts._extra_train_specs:
        ts.register_train_spec(SPEC_NAME, spec)


def make_trainer_class():
    from torchtitan.train import Trainer

    class BenchTrainer(Trainer):
        """torchtitan's Trainer, keeping the last micro-batch loss (local sum / global tokens)."""

        last_loss = None

        def forward_backward_step(self, **kwargs):
            loss = super().forward_backward_step(**kwargs)
            self.last_loss = loss.detach()
            return loss

    return BenchTrainer


class _CpuDeviceModule:
    """What torchtitan asks of ``torch.cuda`` through ``tools.utils.device_module``, for a CPU
    plumbing run (torchtitan 0.2.2 assumes "cuda" where it finds no accelerator)."""

    @staticmethod
    def set_device(device):
        pass

    @staticmethod
    def current_device():
        return 0

    @staticmethod
    def get_device_name(device=None):
        return "cpu"

    @staticmethod
    def get_device_properties(device=None):
        import types

        return types.SimpleNamespace(total_memory=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))

    @staticmethod
    def memory_stats(device=None):
        return {}

    @staticmethod
    def reset_peak_memory_stats(device=None):
        pass

    @staticmethod
    def empty_cache():
        pass

    @staticmethod
    def synchronize(device=None):
        pass


def use_cpu_device() -> None:
    import torchtitan.components.metrics
    import torchtitan.distributed.parallel_dims
    import torchtitan.distributed.utils
    import torchtitan.tools.profiling
    import torchtitan.tools.utils

    for mod in (torchtitan.tools.utils, torchtitan.distributed.utils, torchtitan.distributed.parallel_dims,
                torchtitan.components.metrics, torchtitan.tools.profiling):
        if hasattr(mod, "device_type"):
            mod.device_type = "cpu"
        if hasattr(mod, "device_module"):
            mod.device_module = _CpuDeviceModule


def describe(job_config, dims, on_gpu: bool) -> str:
    pc = job_config.parallelism
    parts = [f"FSDP2 dp_shard={dims.dp_shard} cp={dims.cp}" if dims.fsdp_enabled else "one rank, no FSDP"]
    if dims.cp > 1:
        parts.append(f"ring attention over SDPA (cuDNN>flash>math), {pc.context_parallel_load_balancer} balance, "
                     f"rotate={pc.context_parallel_rotate_method}")
    parts.append(f"AC={job_config.activation_checkpoint.mode}")
    comp = job_config.compile
    parts.append(f"compile={','.join(comp.components) if comp.enable else 'off'}")
    parts.append(f"params {job_config.training.dtype} master/{job_config.training.mixed_precision_param} compute")
    parts.append(f"{job_config.optimizer.name}({job_config.optimizer.implementation})"
                 f"{' on GPU' if on_gpu else ''}")
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def run(args, writer: common.ResultWriter, rec: dict) -> dict:
    rank, world, local_rank, device = common.launcher_device(args.device)
    on_gpu = device.type == "cuda"
    rec.update(common.apply_gpu_cap(args.gpu_cap_gb, device))

    m, seq_len = load_model_config(args)
    common.maybe_simulate_oom(seq_len)
    if m.tie_embeddings:
        rec["shape_note_tie"] = "torchtitan's Llama has separate embedding and output weights (untied); FLOPs unchanged"
    cp = args.cp or world
    if world % cp:
        raise ValueError(f"--cp {cp} does not divide the world size {world}")
    if seq_len % (2 * cp):
        raise ValueError(f"--seq-len {seq_len}: torchtitan's CP load balancing needs a multiple of 2 x cp = {2 * cp}")
    total = args.warmup + args.steps + (0 if args.no_profile else 1)
    dump = args.dump_folder or tempfile.mkdtemp(prefix="titan_bench_")
    rec.update(config=args.config + (" (tiny)" if args.tiny else ""), seq_len=seq_len, world_size=world, sp=cp,
               dp=world // cp, batch_size=1, steps=args.steps, warmup=args.warmup,
               alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
    if not args.no_kernel_rates and on_gpu:
        rec["kernel_rates"] = common.kernel_rates(device, m.n_heads, m.n_kv_heads, m.head_dim, attn_backend="cudnn",
                                                  attn_seq=min(seq_len // cp, 32768))
        common.log(f"kernel rates: {rec['kernel_rates']}", rank)

    t0 = time.perf_counter()
    phases = rec.setdefault("setup_phases_s", {})
    note = guard_datasets_import()
    if note:
        rec["datasets_note"] = note
        common.log(note, rank)
    import torchtitan
    from torchtitan.config import ConfigManager
    from torchtitan.distributed import utils as dist_utils

    phases["import"] = time.perf_counter() - t0
    version = getattr(torchtitan, "__version__", "?")
    rec["versions"] = {"torchtitan": version}
    if not on_gpu:
        use_cpu_device()
    margs = titan_model_args(m, seq_len)
    register_spec(margs)
    cli = titan_cli(args, seq_len, cp, total, dump)
    rec["titan_cli"] = cli
    job_config = ConfigManager().parse_args(cli)
    common.log(f"torchtitan {version}; world={world} cp={cp} seq_len={seq_len}; args: {' '.join(cli)}", rank)
    writer.enabled = writer.enabled and rank == 0
    writer.write()

    t = time.perf_counter()
    trainer = make_trainer_class()(job_config)
    trainer.metrics_processor.should_log = lambda step: False  # its log resets the peak-memory counters
    phases["trainer_init"] = time.perf_counter() - t
    dims = trainer.parallel_dims
    model = trainer.model_parts[0]
    w1 = next(mod for name, mod in model.named_modules() if name.endswith("feed_forward.w1"))
    ffn = w1.weight.shape[0]  # a DTensor under FSDP: its global shape
    if ffn != m.ffn_dim:
        raise RuntimeError(f"torchtitan built an FFN of {ffn}, not model.ffn_dim={m.ffn_dim} ({ffn_args(m.dim, m.ffn_dim)})")
    n_params = sum(p.numel() for p in model.parameters())  # DTensors count their global size
    setup_s = time.perf_counter() - t0
    rec.update(status="setup_done", setup_s=setup_s, device=common.device_name(device), params=n_params,
               configuration=describe(job_config, dims, on_gpu),
               parallel={"dp_shard": dims.dp_shard, "dp_replicate": dims.dp_replicate, "cp": dims.cp,
                         "tp": dims.tp, "pp": dims.pp, "fsdp": dims.fsdp_enabled})
    writer.write()
    common.log(f"setup {setup_s:.1f} s; {rec['configuration']}; {common.mem_line(device)}", rank)

    from longtrain.models.costs import flops_per_token
    from longtrain.trainer.metrics import device_peak_flops

    tokens_per_step = seq_len * (world // cp)
    peak, peak_src = device_peak_flops(device)
    fpt = flops_per_token(m, seq_len, causal=False)
    fpt_c = flops_per_token(m, seq_len, causal=True)
    rec.update(tokens_per_step=tokens_per_step, peak_flops=peak, peak_flops_source=peak_src,
               flops_per_token=fpt, flops_per_token_causal=fpt_c)

    from datetime import timedelta

    data = trainer.batch_generator(trainer.dataloader)

    def step():
        trainer.step += 1
        trainer.gc_handler.run(trainer.step)
        trainer.train_step(data)
        if trainer.step == 1:  # as Trainer.train: the short training timeout once compiled
            dist_utils.set_pg_timeouts(timedelta(seconds=job_config.comm.train_timeout_seconds), dims)
        return trainer.last_loss

    def global_loss(local) -> float:
        import torch.distributed as dist

        x = local.detach().float().reshape(1).clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(x)  # local sum / global tokens, summed over dp x cp (tp = pp = 1)
        return float(x)

    prof = common.run_timed_steps(step, warmup=args.warmup, steps=args.steps, profile=not args.no_profile,
                                  trace_dir=args.trace_dir, rec=rec, writer=writer, device=device, rank=rank,
                                  tokens_per_step=tokens_per_step, world=world, fpt=fpt, fpt_c=fpt_c, peak=peak,
                                  loss_value=global_loss)

    common.finish_record(rec, writer, device, m, world, rank, prof)
    trainer.close()
    return rec


def main(argv=None) -> int:
    return common.run_main("torchtitan", "titan", run, build_parser().parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
