"""The offloaded optimizer follows torch AdamW; parameter groups and FSDP2 policy are as documented."""

import pytest
import torch

from longtrain.config import ConfigError, load_config
from longtrain.memory.optimizer_offload import (CPUOffloadAdamW, build_optimizer, cpu_adam_available,
                                                fsdp_offload_policy, param_groups)
from longtrain.models import build_model

torch.set_num_threads(1)


def cfg_for(**memory):
    over = ["model.arch=llama", "model.dim=32", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=48",
            "model.vocab_size=61", "model.n_layers=2", "optim.lr=1e-2", "optim.weight_decay=0.1",
            "optim.beta2=0.99"]
    return load_config(None, over + [f"memory.{k}={v}" for k, v in memory.items()])


def train_steps(cfg, steps=4, use_sched=True):
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = build_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)) if use_sched else None
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        tokens = torch.randint(0, 61, (2, 12), generator=g)
        model(tokens, labels=tokens.roll(-1, 1)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)  # changes grads after backward
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sched:
            sched.step()
    return model, opt


@pytest.mark.parametrize("impl", ["torch", "deepspeed"])
def test_offloaded_adamw_matches_torch_adamw_after_steps(impl):
    if impl == "deepspeed":
        # the test extras install deepspeed (no prebuilt ops); its CPU Adam op JIT-compiles at first
        # use (1-2 min of CPU) into ~/.cache/torch_extensions, where later runs find it
        pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install -e '.[test]' installs it)")
        ok, why = cpu_adam_available()
        assert ok, f"deepspeed is installed but DeepSpeedCPUAdam does not build or load here: {why}"
    ref, ref_opt = train_steps(cfg_for())
    off, off_opt = train_steps(cfg_for(optimizer_offload=True, optimizer_offload_impl=impl))
    assert isinstance(ref_opt, torch.optim.AdamW) and isinstance(off_opt, CPUOffloadAdamW)
    assert off_opt.impl_name.startswith("deepspeed" if impl == "deepspeed" else "torch")
    # different kernels (fused / vectorised C++) round differently; Adam's 1/sqrt(v) amplifies that
    # where gradients are near zero, so the bound is 1e-3 of one step (lr=1e-2)
    for (n, a), (_, b) in zip(ref.named_parameters(), off.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")
    # state is visible per model parameter and round-trips through state_dict
    p = next(off.parameters())
    assert off_opt.state[p]["exp_avg"].device.type == "cpu"
    sd = off_opt.state_dict()
    assert len(sd["state"]) == sum(1 for _ in off.parameters())
    off_opt.load_state_dict(sd)


def test_weight_decay_only_on_matrices():
    cfg = cfg_for()
    model = build_model(cfg.model)
    groups = {g["name"]: g for g in param_groups(model, 0.1)}
    assert all(p.ndim >= 2 for p in groups["decay"]["params"]) and groups["decay"]["weight_decay"] == 0.1
    assert all(p.ndim == 1 for p in groups["no_decay"]["params"]) and groups["no_decay"]["weight_decay"] == 0.0
    n = sum(len(g["params"]) for g in groups.values())
    assert n == len(list(model.parameters()))


def test_offloaded_optimizer_handles_dtensor_parameters_through_local_shards():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    if not dist.is_initialized():
        import socket
        s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        torch.manual_seed(0)
        w = torch.randn(6, 4)
        b = torch.randn(4)
        ref = [torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())]
        dt = [torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)])),
              torch.nn.Parameter(distribute_tensor(b.clone(), mesh, [Replicate()]))]
        o_ref = torch.optim.AdamW(ref, lr=0.1, weight_decay=0.0)
        o_dt = CPUOffloadAdamW(dt, lr=0.1, impl="torch")
        for step in range(3):
            for ps, o in ((ref, o_ref), (dt, o_dt)):
                loss = (ps[0].sum(1) * 0.5).pow(2).sum() + (ps[1] * (step + 1)).pow(2).sum()
                loss.backward()
                o.step()
                o.zero_grad()
        torch.testing.assert_close(dt[0].full_tensor(), ref[0].detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dt[1].full_tensor(), ref[1].detach(), rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_fsdp_offload_policy_is_none_unless_asked():
    from torch.distributed.fsdp import CPUOffloadPolicy

    assert fsdp_offload_policy(cfg_for()) is None
    assert isinstance(fsdp_offload_policy(cfg_for(fsdp_cpu_offload=True)), CPUOffloadPolicy)


def test_two_cpu_offloads_at_once_is_a_config_error():
    with pytest.raises(ConfigError, match="fsdp_cpu_offload"):
        cfg_for(optimizer_offload=True, fsdp_cpu_offload=True)
