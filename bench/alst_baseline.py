"""The same measurement as bench_train.py, for DeepSpeed's Arctic Long Sequence Training (ALST).

    torchrun --nproc_per_node=2 bench/alst_baseline.py --config llama3-8b --seq-len 131072 \
        --steps 5 --warmup 2 --out alst.json

A randomly initialised Hugging Face ``LlamaForCausalLM`` of the shape in our config (no download:
``LlamaConfig`` is built from ``model.*``; ``attn_implementation="sdpa"``), bf16, trained with the
ALST recipe as DeepSpeed 0.19 ships it (deepspeed/runtime/sequence_parallel/ulysses_sp.py, the
DeepSpeed ALST tutorial and ArcticTraining's projects/sequence-parallelism configs):

- Ulysses sequence parallelism for HF models: ``UlyssesSPAttentionHF.register_with_transformers``
  (sp = ``--sp``, default the world size); each rank takes its slice of the sequence with
  pre-shifted labels, exactly as ``UlyssesSPDataLoaderAdapter`` would hand it (done by hand here:
  every rank draws the same synthetic sequence, so no gather is needed);
- ``TiledMLP`` patched into ``LlamaMLP.forward`` (shards = ceil(local seq / hidden), as the tutorial);
- tiled logits + loss: ``TiledFusedLogitsLoss`` over ~1 GiB fp32-logit shards (ArcticTraining's
  non-Liger path; Liger is not installed on the device);
- ZeRO-3 with the optimizer where it fits best (``--optimizer``): ``auto`` (the default) first runs
  AdamW on the GPU (torch's fused AdamW through DeepSpeed's ``torch_adam``, no ``offload_optimizer``),
  and only if that run fails with an out-of-memory error runs again, in a fresh process, with
  ``offload_optimizer: cpu`` (``DeepSpeedCPUAdam``, AdamW mode), the recipe's memory-lean setting;
  ``gpu`` / ``cpu`` force one. With the CPU optimizer on a single GPU also ``offload_param: cpu``,
  as ArcticTraining's single-GPU 8B recipe (``--offload-param``; off otherwise);
- activation checkpointing (HF, non-reentrant) with the checkpointed hidden states offloaded to
  pinned CPU memory: DeepSpeed's ``get_checkpoint_hidden_states_offloading_ctx_manager``
  (``--act-offload ds``), or ``torch.autograd.graph.save_on_cpu`` (``--act-offload save_on_cpu``);
- ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``.

``--optimizer auto`` needs a fresh process per attempt (an out-of-memory error inside a ZeRO-3 step
leaves the other ranks blocked in collectives; nothing in-process recovers that reliably), so the
script launches itself: ``python bench/alst_baseline.py --nproc 2 ...`` starts torchrun with
``--optimizer gpu``, reads the record, and on ``status: "OOM"`` starts it again with ``--optimizer
cpu``; the final record lists both attempts (``optimizer_attempts``, ``optimizer_fallback``). Under
torchrun itself give ``--optimizer gpu`` or ``cpu``.

The SDPA kernel is pinned to cuDNN by default (``--sdpa-backend``; the fastest causal kernel on an
H200: 567 TFLOP/s fwd+bwd against flash's 324), on a GPU; a CPU run leaves PyTorch's choice.

DeepSpeedCPUAdam is JIT-compiled (ninja + the host compiler) the first time on a machine: that
build runs before anything is timed and is reported as ``cpu_adam_build_s`` (CPU optimizer only).

Writes the JSON schema of bench/common.py (``system: "alst"``), rewritten after every phase;
OOM -> ``status: "OOM"`` and exit code 3. ``--device cpu --tiny`` runs the path on a CPU (gloo,
fp32 and bf16 CPU kernels, no offload streams) to check the plumbing, not the speed.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations in torch/transformers: noise here

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))
_BENCH = Path(__file__).resolve().parent
if str(_BENCH) not in sys.path:
    sys.path.insert(0, str(_BENCH))

import common  # noqa: E402
from bench_train import TINY_MODEL, parse_seq_len  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="llama3.2-1b", help="shipped longtrain config whose model.* shape to build")
    p.add_argument("--seq-len", type=parse_seq_len, default=None, help="tokens per sequence (global)")
    p.add_argument("--sp", type=int, default=0, help="Ulysses size; 0 = the world size")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--tiny", action="store_true", help="tiny shape and sequence (CPU plumbing check)")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--trace-dir", default=None)
    p.add_argument("--offload-param", choices=["auto", "on", "off"], default="auto",
                   help="ZeRO-3 offload_param to CPU; auto = on for a single GPU with the CPU optimizer "
                        "(ArcticTraining's sp1 recipe), off otherwise")
    p.add_argument("--act-offload", choices=["auto", "ds", "save_on_cpu", "none"], default="auto",
                   help="checkpointed hidden states to CPU; auto = ds on GPU, none on CPU")
    p.add_argument("--no-checkpointing", action="store_true", help="turn off activation checkpointing")
    p.add_argument("--no-tiled-mlp", action="store_true")
    p.add_argument("--no-tiled-loss", action="store_true", help="plain lm_head + cross-entropy on the full logits")
    p.add_argument("--loss-shard-gib", type=float, default=1.0, help="fp32 logits per loss shard (ArcticTraining: 1)")
    p.add_argument("--optimizer", choices=["auto", "gpu", "cpu"], default="auto",
                   help="AdamW on the GPU (torch fused, via DeepSpeed's torch_adam) or offloaded to the CPU "
                        "(offload_optimizer: cpu, DeepSpeedCPUAdam); auto = gpu, then cpu in a fresh run if "
                        "gpu runs out of memory")
    p.add_argument("--nproc", type=int, default=1,
                   help="GPUs; without torchrun around it the script starts torchrun itself with this many "
                        "processes (needed by --optimizer auto)")
    p.add_argument("--sdpa-backend", choices=["default", "cudnn", "flash", "efficient"], default="cudnn",
                   help="pin PyTorch SDPA's kernel on a GPU (default cudnn, the fastest causal kernel on "
                        "H100/H200; 'default' leaves PyTorch's choice)")
    p.add_argument("--no-kernel-rates", action="store_true", help="skip the matmul/attention microbenchmarks")
    p.add_argument("--no-pin-memory", action="store_true", help="ZeRO offload buffers in pageable memory")
    p.add_argument("--tie", choices=["auto", "keep", "untie"], default="auto",
                   help="tied embedding/output weights (Llama-3.2-1B): auto = untie when the tiled loss is on, "
                        "since DeepSpeed 0.19.8's ZeRO-3 asserts on a tied weight whose output-head gradient "
                        "TiledFusedLogitsLoss computes inside forward (same FLOPs; +vocab x dim parameters)")
    p.add_argument("--lr", type=float, default=1e-5)
    common.add_gpu_cap_arg(p)
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the longtrain config (model.* matter)")
    return p


# --------------------------------------------------------------------------------------------
# Pieces of the recipe
# --------------------------------------------------------------------------------------------


def load_model_config(args):
    from longtrain.config import load_config

    ov = list(TINY_MODEL) if args.tiny else []
    ov += list(args.overrides)
    ov = [o for o in ov if o.startswith("model.")]  # only the shape matters here
    cfg = load_config(args.config, ov + [f"model.max_seq_len={2**31 - 1}"])
    seq = args.seq_len if args.seq_len is not None else (256 if args.tiny else cfg.data.seq_len)
    return cfg.model, seq


def hf_llama_config(m, seq_len: int):
    """A transformers ``LlamaConfig`` of the same shape as our ``ModelConfig``."""
    import inspect

    from transformers import LlamaConfig

    n_layers = m.n_layers if m.arch == "llama" else m.n_unrolled_layers
    kw = dict(vocab_size=m.vocab_size, hidden_size=m.dim, intermediate_size=m.ffn_dim,
              num_hidden_layers=n_layers, num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads,
              head_dim=m.head_dim, rms_norm_eps=m.norm_eps, max_position_embeddings=max(seq_len, 8192),
              tie_word_embeddings=m.tie_embeddings, attention_bias=False, mlp_bias=False,
              hidden_act="silu", use_cache=False, initializer_range=m.init_std)
    params = inspect.signature(LlamaConfig.__init__).parameters
    if "rope_parameters" in params:  # transformers >= 5
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": m.rope_theta}
    else:
        kw["rope_theta"] = m.rope_theta
    kw = {k: v for k, v in kw.items() if k in params or "kwargs" in params}
    cfg = LlamaConfig(**kw)
    cfg._attn_implementation = "sdpa"
    return cfg, n_layers


def patch_tiled_mlp() -> None:
    """``LlamaMLP.forward`` -> DeepSpeed ``TiledMLP`` (the tutorial's patch). Shards =
    ceil(local seq / hidden). The tutorial all-reduces the max shard count over ranks on every
    call; here every rank holds the same local length by construction, so that is skipped."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP
    from transformers.models.llama import modeling_llama

    def mlp_forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    def tiled_mlp_forward(self, x):
        seqlen, hidden = x.shape[-2], x.shape[-1]
        shards = max(1, math.ceil(seqlen / hidden))
        params = [self.down_proj.weight, self.gate_proj.weight, self.up_proj.weight]
        return TiledMLP.apply(mlp_forward, self, x, shards, params)

    modeling_llama.LlamaMLP.forward = tiled_mlp_forward


def ds_config(args, sp: int, offload_param: bool, on_gpu: bool, optimizer: str) -> dict:
    """The DeepSpeed config. ``optimizer``: ``cpu`` = ``offload_optimizer: cpu`` (DeepSpeedCPUAdam);
    ``gpu`` = no optimizer offload, AdamW as torch's (``torch_adam``; fused kernels on a GPU) so no
    CUDA extension has to be JIT-built (DeepSpeed's FusedAdam would need nvcc on the machine)."""
    pin = on_gpu and not args.no_pin_memory
    zero = {"stage": 3}
    opt_params = {"lr": args.lr, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}
    if optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    else:
        opt_params["torch_adam"] = True
        if on_gpu:
            opt_params["fused"] = True  # passed through to torch.optim.AdamW
    if offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True},
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": opt_params},
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if sp > 1:
        cfg["sequence_parallel_size"] = sp
        cfg["seq_parallel_communication_data_type"] = "bf16"
    return cfg


def build_cpu_adam() -> float:
    """JIT-build (or load the cached build of) DeepSpeedCPUAdam; seconds taken."""
    from deepspeed.ops.op_builder import CPUAdamBuilder

    t0 = time.perf_counter()
    CPUAdamBuilder().load(verbose=False)
    return time.perf_counter() - t0


def synthetic_batch(seq_len: int, vocab: int, step: int, dp_rank: int, sp_rank: int, sp: int, device):
    """This rank's slice of one sequence: input_ids, position_ids and pre-shifted labels
    (``UlyssesSPDataLoaderAdapter``'s output). Every rank of an sp group draws the same tokens."""
    import torch

    g = torch.Generator().manual_seed(1_000_003 * step + dp_rank)
    ids = torch.randint(0, vocab, (1, seq_len), generator=g)
    pos = torch.arange(seq_len).unsqueeze(0)
    shift = torch.nn.functional.pad(ids, (0, 1), value=-100)[:, 1:]
    chunk = seq_len // sp
    sl = slice(chunk * sp_rank, chunk * (sp_rank + 1))
    return {k: v[:, sl].contiguous().to(device) for k, v in
            (("input_ids", ids), ("position_ids", pos), ("shift_labels", shift))}


def mark_checkpoint_inputs(model, ds_ctx) -> int:
    """Make DeepSpeed's checkpoint-offload manager see the tensor checkpoint really saves.

    The manager marks ``args[0]`` in ``GradientCheckpointingLayer.__call__``; but ZeRO-3's
    forward pre-hooks hand ``forward`` a new tensor object, and transformers >= 5 checkpoints
    ``forward`` (after the hooks), so the saved tensor is never the marked one and nothing is
    offloaded (seen here: ``marked_tensors`` > 0, ``offloaded_tensors`` = 0). Marking the first
    argument of each layer's checkpoint function instead marks exactly what the checkpoint saves,
    with any transformers version. Returns the number of layers wrapped."""
    try:
        from transformers import GradientCheckpointingLayer as layer_type
    except ImportError:
        layer_type = object
    n = 0
    for mod in model.modules():
        if not isinstance(mod, layer_type):
            continue
        fn = getattr(mod, "_gradient_checkpointing_func", None)
        if fn is None or getattr(fn, "_bench_marks", False):
            continue

        def marking(function, *args, _orig=fn, **kwargs):
            if args and hasattr(args[0], "data_ptr") and _is_active(ds_ctx):
                ds_ctx.mark(args[0])
            return _orig(function, *args, **kwargs)

        marking._bench_marks = True
        mod._gradient_checkpointing_func = marking
        n += 1
    return n


def _is_active(ds_ctx) -> bool:
    """Whether ``ds_ctx`` is the manager in use (a private helper of DeepSpeed; if it moved,
    assume so: the layers run only inside the step, which always enters the manager)."""
    try:
        from deepspeed.runtime.activation_checkpointing import offload_activations as oa

        return ds_ctx in list(oa._manager_stack())
    except Exception:  # noqa: BLE001
        return True


def _sdpa_ctx(name: str):
    if name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([{"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                         "efficient": SDPBackend.EFFICIENT_ATTENTION}[name]])


def make_step(args, engine, seq_len: int, vocab: int, sp: int, sp_group, sp_rank: int, dp_rank: int,
              device, act_offload: str, info: dict):
    import torch
    import torch.nn.functional as F
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

    model = engine.module  # LlamaForCausalLM
    ds_ctx = None
    if act_offload == "ds":
        from deepspeed.runtime.activation_checkpointing.offload_activations import (
            get_checkpoint_hidden_states_offloading_ctx_manager,
        )

        ds_ctx = get_checkpoint_hidden_states_offloading_ctx_manager()
        info["act_offload_ctx"] = ds_ctx
        info["act_offload_marked_at_checkpoint"] = mark_checkpoint_inputs(model, ds_ctx)
    local = seq_len // sp
    loss_shards = max(1, math.ceil(local * vocab * 4 / (args.loss_shard_gib * 2**30)))
    info["loss_shards"] = loss_shards
    state = {"step": 0}

    def loss_fn(mod, x, y):
        logits = mod.lm_head(x)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                               ignore_index=-100, reduction="sum")

    def act_ctx():
        if act_offload == "ds":
            return ds_ctx
        if act_offload == "save_on_cpu":
            return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")
        return contextlib.nullcontext()

    def step():
        batch = synthetic_batch(seq_len, vocab, state["step"], dp_rank, sp_rank, sp, device)
        labels = batch["shift_labels"]
        with _sdpa_ctx(args.sdpa_backend), act_ctx():
            out = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
            hidden = out.last_hidden_state
            if args.no_tiled_loss:
                loss_sum = loss_fn(model, hidden, labels)
            else:
                loss_sum = TiledFusedLogitsLoss.apply(loss_fn, model, hidden, labels, None, loss_shards,
                                                      [model.lm_head.weight], "sum")
            good = (labels != -100).sum()
            loss = loss_sum / good.clamp(min=1)
            if sp > 1:
                # differentiable token-weighted mean over the sp group (the tutorial's aggregation)
                import torch.distributed.nn.functional as dfn

                losses = dfn.all_gather(loss, group=sp_group)
                goods = dfn.all_gather(good, group=sp_group)
                loss = sum(losses[r] * goods[r] for r in range(sp)) / sum(goods).clamp(min=1)
            engine.backward(loss)
        engine.step()
        state["step"] += 1
        return loss.detach()

    return step


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def run(args, writer: common.ResultWriter, rec: dict) -> dict:
    if args.optimizer == "auto":
        raise SystemExit("--optimizer auto runs each attempt in a fresh process, so it cannot run under torchrun: "
                         "start `python bench/alst_baseline.py --nproc N ...` (it launches torchrun), or give "
                         "--optimizer gpu or --optimizer cpu")
    rank, world, local_rank, device = common.launcher_device(args.device)
    on_gpu = device.type == "cuda"
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is imported
    import torch
    cap = common.apply_gpu_cap(args.gpu_cap_gb, device)

    m, seq_len = load_model_config(args)
    common.maybe_simulate_oom(seq_len)
    if not on_gpu and args.sdpa_backend != "default":
        rec["sdpa_backend_note"] = f"--sdpa-backend {args.sdpa_backend} applies on a GPU; this CPU run lets PyTorch choose"
        args.sdpa_backend = "default"
    untie = m.tie_embeddings and (args.tie == "untie" or (args.tie == "auto" and not args.no_tiled_loss))
    if untie:
        import dataclasses

        m = dataclasses.replace(m, tie_embeddings=False)
        rec["shape_note_tie"] = ("embedding and output weights untied for ALST (ZeRO-3 + TiledFusedLogitsLoss "
                                 "cannot reduce a tied weight's two gradients in one bucket); FLOPs unchanged")
    sp = args.sp or world
    if world % sp:
        raise ValueError(f"--sp {sp} does not divide the world size {world}")
    if seq_len % sp:
        raise ValueError(f"--seq-len {seq_len} is not divisible by sp={sp}")
    dp = world // sp
    # auto: ArcticTraining's single-GPU recipe offloads parameters with the optimizer; with the
    # optimizer on the GPU (the attempt that fits when it can) nothing is offloaded
    offload_param = args.offload_param == "on" or (args.offload_param == "auto" and world == 1
                                                   and args.optimizer == "cpu")
    act_offload = args.act_offload if args.act_offload != "auto" else ("ds" if on_gpu else "none")
    if args.no_checkpointing and act_offload == "ds":
        act_offload = "none"  # the ds manager offloads checkpoint inputs only
    rec.update(config=args.config + (" (tiny)" if args.tiny else ""), seq_len=seq_len, world_size=world,
               sp=sp, dp=dp, batch_size=1, steps=args.steps, warmup=args.warmup,
               alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), **cap,
               recipe={"ulysses": sp > 1, "tiled_mlp": not args.no_tiled_mlp, "tiled_loss": not args.no_tiled_loss,
                       "zero_stage": 3,
                       "offload_optimizer": "cpu (DeepSpeedCPUAdam)" if args.optimizer == "cpu" else "none",
                       "optimizer": OPTIMIZER_NAMES[args.optimizer],
                       "offload_param": "cpu" if offload_param else "none",
                       "activation_checkpointing": not args.no_checkpointing, "activation_offload": act_offload,
                       "sdpa_backend": args.sdpa_backend, "attn_implementation": "sdpa",
                       "pin_memory": on_gpu and not args.no_pin_memory})
    if m.arch != "llama":
        rec["shape_note"] = (f"model.arch={m.arch}: ALST has no weight-shared loops; built as a plain Llama "
                             f"of the same unrolled depth ({m.n_unrolled_layers} layers)")
    rec["optimizer_placement"] = args.optimizer
    rec["configuration"] = describe(rec["recipe"], sp)
    if rec.get("optimizer_fallback"):
        rec["configuration"] += "; fallback: the GPU optimizer ran out of memory"
    if os.environ.get("BENCH_SIMULATE_OOM_OPTIMIZER") == args.optimizer:  # test hook of the auto fallback
        raise torch.cuda.OutOfMemoryError(f"simulated: --optimizer {args.optimizer} "
                                          f"(BENCH_SIMULATE_OOM_OPTIMIZER={args.optimizer})")
    shape = m if m.arch == "llama" else _as_llama(m)
    if on_gpu and not args.no_kernel_rates:  # before the model takes the memory; Ulysses: heads / sp per GPU
        rec["kernel_rates"] = common.kernel_rates(device, max(1, shape.n_heads // sp), max(1, shape.n_kv_heads // sp),
                                                  shape.head_dim, attn_backend=args.sdpa_backend,
                                                  attn_seq=min(seq_len, 32768))
        common.log(f"kernel rates: {rec['kernel_rates']}", rank)

    t0 = time.perf_counter()
    phases = rec.setdefault("setup_phases_s", {})
    import deepspeed
    import deepspeed.comm as dscomm
    import transformers

    phases["import"] = time.perf_counter() - t0

    rec["versions"] = {"deepspeed": deepspeed.__version__, "transformers": transformers.__version__}
    t = time.perf_counter()
    dscomm.init_distributed(dist_backend="nccl" if on_gpu else "gloo", dist_init_required=True)
    phases["init_distributed"] = time.perf_counter() - t
    common.log(f"deepspeed {deepspeed.__version__}, transformers {transformers.__version__}; world={world} "
               f"sp={sp} dp={dp} seq_len={seq_len} offload_param={offload_param} act_offload={act_offload}", rank)
    writer.enabled = writer.enabled and rank == 0

    rec["cpu_adam_build_s"] = None  # built for the CPU optimizer only
    if args.optimizer == "cpu":
        common.log("building DeepSpeedCPUAdam (JIT; first time on a machine takes 1-2 min)", rank)
        rec["cpu_adam_build_s"] = build_cpu_adam()
        common.log(f"DeepSpeedCPUAdam ready in {rec['cpu_adam_build_s']:.1f} s", rank)
    writer.write()

    if not args.no_tiled_mlp:
        patch_tiled_mlp()
    from transformers import LlamaForCausalLM

    hf_cfg, n_layers = hf_llama_config(m, seq_len)
    t = time.perf_counter()
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):  # random init on the GPU is fast; ZeRO-3 partitions it next
            model = LlamaForCausalLM(hf_cfg)
    finally:
        torch.set_default_dtype(prev)
    if not args.no_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    phases["build_model"] = time.perf_counter() - t
    common.log(f"model built ({n_params / 1e9:.2f} B parameters) in {phases['build_model']:.1f} s; "
               f"deepspeed.initialize", rank)
    t = time.perf_counter()
    mpu = None
    if sp > 1:
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

        mpu = UlyssesSPAttentionHF.register_with_transformers(
            model_name_or_path=model, core_attn_implementation="sdpa", sequence_parallel_size=sp,
            micro_batch_size=1, seq_length=seq_len, seq_length_is_variable=True)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=ds_config(args, sp, offload_param, on_gpu, args.optimizer),
                                           mpu=mpu)
    del model
    phases["deepspeed_initialize"] = time.perf_counter() - t
    if sp > 1:
        from deepspeed.utils import groups

        sp_group = groups._get_sequence_parallel_group()
        sp_rank = groups._get_sequence_parallel_rank()
    else:
        sp_group, sp_rank = None, 0
    dp_rank = rank // sp
    setup_s = time.perf_counter() - t0
    rec.update(status="setup_done", setup_s=setup_s, device=common.device_name(device), params=n_params,
               hf_layers=n_layers)
    writer.write()
    common.log(f"setup {setup_s:.1f} s; {n_params / 1e9:.2f} B parameters; {common.mem_line(device)}", rank)

    from longtrain.models.costs import flops_per_token
    from longtrain.trainer.metrics import device_peak_flops

    tokens_per_step = seq_len * dp
    peak, peak_src = device_peak_flops(device)
    fpt = flops_per_token(shape, seq_len, causal=False)
    fpt_c = flops_per_token(shape, seq_len, causal=True)
    rec.update(tokens_per_step=tokens_per_step, peak_flops=peak, peak_flops_source=peak_src,
               flops_per_token=fpt, flops_per_token_causal=fpt_c)

    info: dict = {}
    step = make_step(args, engine, seq_len, m.vocab_size, sp, sp_group, sp_rank, dp_rank, device, act_offload, info)
    rec["loss_shards"] = info.get("loss_shards")
    prof = common.run_timed_steps(step, warmup=args.warmup, steps=args.steps, profile=not args.no_profile,
                                  trace_dir=args.trace_dir, rec=rec, writer=writer, device=device, rank=rank,
                                  tokens_per_step=tokens_per_step, world=world, fpt=fpt, fpt_c=fpt_c, peak=peak,
                                  loss_value=float)
    ctx = info.get("act_offload_ctx")
    if ctx is not None and hasattr(ctx, "stats"):
        import dataclasses

        try:
            rec["act_offload_stats"] = dataclasses.asdict(ctx.stats)  # counts since the last step began
        except TypeError:
            rec["act_offload_stats"] = repr(ctx.stats)
        rec["act_offload_layers_marked"] = info.get("act_offload_marked_at_checkpoint")
        st = rec["act_offload_stats"]
        if isinstance(st, dict) and device.type == "cuda" and not st.get("offloaded_tensors"):
            rec["warning"] = "activation offload was on but offloaded no tensor in the profiled step"
            common.log(f"WARNING: {rec['warning']}: {st}", rank)

    common.finish_record(rec, writer, device, shape, world, rank, prof)
    return rec


OPTIMIZER_NAMES = {"gpu": "AdamW on the GPU (torch fused, via torch_adam)",
                   "cpu": "AdamW on the CPU (DeepSpeedCPUAdam, offload_optimizer)"}


def describe(recipe: dict, sp: int) -> str:
    """One line naming the ALST configuration a run used (the table prints it)."""
    parts = [f"ZeRO-3 sp={sp}", f"optimizer {'cpu' if recipe['offload_optimizer'] != 'none' else 'gpu'}",
             f"params {'cpu' if recipe['offload_param'] != 'none' else 'gpu'}"]
    if recipe["activation_checkpointing"]:
        parts.append(f"ckpt offload={recipe['activation_offload']}")
    else:
        parts.append("no checkpointing")
    parts += [x for x, on in (("tiled MLP", recipe["tiled_mlp"]), ("tiled loss", recipe["tiled_loss"])) if on]
    parts.append(f"sdpa={recipe['sdpa_backend']}")
    return ", ".join(parts)


def _as_llama(m):
    import dataclasses

    return dataclasses.replace(m, arch="llama", n_layers=m.n_unrolled_layers, lora_rank=0, reinject="none")


# --------------------------------------------------------------------------------------------
# --optimizer auto: one fresh run per attempt
# --------------------------------------------------------------------------------------------

_ATTEMPTS_ENV = "BENCH_ALST_EARLIER_ATTEMPTS"  # JSON list the launcher hands the next attempt's record


def child_argv(argv: list, optimizer: str) -> list:
    """``argv`` without ``--optimizer`` and ``--nproc`` (either spelling), then ``--optimizer OPT``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--optimizer", "--nproc"):
            skip = True
            continue
        if a.startswith("--optimizer=") or a.startswith("--nproc="):
            continue
        out.append(a)
    return out + ["--optimizer", optimizer]


def launch_cmd(nproc: int, argv: list) -> list:
    script = str(Path(__file__).resolve())
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                script, *argv]
    return [sys.executable, script, *argv]


def run_attempts(args, argv: list, make_cmd=None) -> int:
    """Run the benchmark in fresh processes: the GPU optimizer first (``--optimizer auto``), the CPU
    optimizer only if that ran out of memory. The final record (``--out``) lists every attempt in
    ``optimizer_attempts`` and says whether the fallback was taken (``optimizer_fallback``).
    ``make_cmd(optimizer, out_path)`` gives each attempt's command (tests pass their own)."""
    import json
    import subprocess
    import tempfile

    out = args.out or os.path.join(tempfile.mkdtemp(prefix="alst_"), "alst.json")
    if make_cmd is None:
        def make_cmd(opt, path):
            a = child_argv(argv, opt)
            if not args.out:
                a += ["--out", path]
            return launch_cmd(args.nproc, a)
    order = ["gpu", "cpu"] if args.optimizer == "auto" else [args.optimizer]
    history: list = []
    rec: dict = {}
    for opt in order:
        cmd = make_cmd(opt, out)
        env = dict(os.environ)
        env[_ATTEMPTS_ENV] = json.dumps(history)
        common.log(f"optimizer {opt}: {' '.join(cmd)}")
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, env=env)
        try:
            with open(out) as f:
                rec = json.load(f)
        except (OSError, ValueError):
            rec = {"status": "error", "error": f"no record at {out} (exit code {rc})"}
        status = rec.get("status") or "error"
        history.append({"optimizer": opt, "status": status, "exit_code": rc, "wall_s": time.perf_counter() - t0,
                        "error": rec.get("error"), "peak_gpu_mem_gib": rec.get("peak_gpu_mem_gib"),
                        "step_time_s_median": rec.get("step_time_s_median")})
        common.log(f"optimizer {opt}: {status} (exit code {rc})")
        if status != "OOM":
            break
    rec["optimizer_attempts"] = history
    rec["optimizer_fallback"] = len(history) > 1
    if args.out:
        common.write_json_atomic(Path(out), rec)
    status = rec.get("status")
    return 0 if status == "ok" else (3 if status == "OOM" else 1)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if "RANK" not in os.environ and (args.optimizer == "auto" or args.nproc > 1):
        return run_attempts(args, argv)
    rank = int(os.environ.get("RANK", "0"))
    rec = common.base_record("alst", [sys.executable, sys.argv[0], *argv])
    earlier = os.environ.get(_ATTEMPTS_ENV)
    if earlier:
        import json

        rec["optimizer_attempts"] = json.loads(earlier)
        rec["optimizer_fallback"] = bool(rec["optimizer_attempts"])
    writer = common.ResultWriter(args.out, rec, enabled=(rank == 0))
    writer.write(force=True)
    try:
        run(args, writer, rec)
    except BaseException as e:  # noqa: BLE001
        code = common.record_failure(rec, e, args.out, rank, "alst")
        os._exit(code)
    common.shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
