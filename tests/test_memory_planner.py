"""The planner's exact terms (``memory.step_memory``), its formulae against what autograd saves
(``memory.activations``), and its choice of policy (``memory.planner``)."""

import dataclasses

import pytest
import torch

from longtrain.config import ConfigError, load_config
from longtrain.memory import planner
from longtrain.memory.activations import layer_activation_bytes, stability_saved_terms
from longtrain.memory.planner import plan, resolve_policy
from longtrain.memory.planner import sizes as Layout  # a mesh-less ParallelDims of these sizes
from longtrain.memory.step_memory import Policy, estimate, policy_of, residual_bytes
from longtrain.models import build_model
from longtrain.models.costs import count_params

torch.set_num_threads(1)


def cfg_for(*extra):
    return load_config(None, ["model.arch=llama", "model.dim=64", "model.n_heads=4", "model.n_kv_heads=2",
                              "model.ffn_dim=96", "model.vocab_size=97", "model.n_layers=3",
                              "data.seq_len=64", "data.batch_size=2", "schedule.dtype=bf16", *extra])


@pytest.mark.parametrize("extra", [[], ["model.tie_embeddings=true"],
                                   ["model.arch=looped", "model.lora_rank=3", "model.reinject=concat"]])
def test_parameter_count_is_exact(extra):
    cfg = cfg_for(*extra)
    assert count_params(cfg.model)["total"] == sum(p.numel() for p in build_model(cfg.model).parameters())


def test_parameter_gradient_and_optimizer_bytes_are_exact_and_sharded():
    cfg = cfg_for()
    n = count_params(cfg.model)["total"]
    step = estimate(cfg, Layout(), Policy()).phase_terms["optimizer step"]
    assert (step["parameters"], step["gradients"], step["optimizer"]) == (4 * n, 4 * n, 8 * n)
    e4 = estimate(cfg, Layout(dp_shard=4), Policy())
    assert e4.gpu["parameters"] == 4 * n // 4 and e4.gpu["optimizer"] == 8 * n // 4
    assert e4.phase_terms["optimizer step"]["gradients"] == 4 * n // 4
    off = estimate(cfg, Layout(), Policy(optimizer_offload=True))
    assert "optimizer" not in off.gpu and off.host["optimizer"] == 16 * n


def test_gradients_during_backward_are_only_the_heads_and_the_peak_is_the_largest_phase():
    """Gradients are set to None each step: while the activations peak (start of backward) only
    the output projection's gradient exists, not the blocks'; with accumulation all of them do."""
    cfg = load_config("llama3.2-1b", ["data.seq_len=65536", "schedule.dtype=bf16"])
    m = cfg.model
    e = estimate(cfg, Layout(), Policy("full"))
    assert e.gpu_total == max(e.phases.values()) and e.phases[e.phase] == e.gpu_total
    # one process in bf16 is FSDP2 on one rank: the root's unsharded gradient is in param_dtype
    assert e.phase_terms["backward (first block)"]["gradients"] == 2 * m.vocab_size * m.dim
    fp32w = load_config("llama3.2-1b", ["data.seq_len=65536", "schedule.dtype=bf16", "parallel.param_dtype=fp32"])
    e32 = estimate(fp32w, Layout(), Policy("full"))
    assert e32.phase_terms["backward (first block)"]["gradients"] == 4 * m.vocab_size * m.dim  # fp32 .grad
    assert "gradients" not in e.phase_terms["backward (loss)"]  # untiled: the CE peak comes first
    acc = load_config("llama3.2-1b", ["data.seq_len=65536", "schedule.dtype=bf16", "schedule.grad_accum=2"])
    n = count_params(m)["total"]
    # fp32 sharded gradients of every block, plus (FSDP on one rank) the root's bf16 unsharded one
    assert estimate(acc, Layout(), Policy("full")).phase_terms["backward (loss)"]["gradients"] == \
        4 * n + 2 * m.vocab_size * m.dim
    acc32 = load_config("llama3.2-1b", ["data.seq_len=65536", "schedule.dtype=bf16", "schedule.grad_accum=2",
                                        "parallel.param_dtype=fp32"])
    assert estimate(acc32, Layout(), Policy("full")).phase_terms["backward (loss)"]["gradients"] == 4 * n
    # untiled loss at 64K: the cross-entropy backward holds three fp32 [T, V] tensors (31.3 GiB each)
    assert e.phase == "backward (loss)"
    assert e.gpu["logits/loss"] >= 12 * 65536 * m.vocab_size


def test_llama3_8b_activation_formula():
    cfg = load_config("llama3-8b")
    m = cfg.model
    # the residual stream is fp32 without FSDP (fp32 parameters), bf16 under FSDP2 param_dtype=bf16,
    # which one process and pp or tp alone use too (a one-rank mesh)
    fp32w = load_config("llama3-8b", ["parallel.param_dtype=fp32"])
    assert residual_bytes(fp32w, Layout(), 2) == 4 and residual_bytes(cfg, Layout(), 2) == 2
    assert residual_bytes(cfg, Layout(pp=2), 2) == 2 and residual_bytes(cfg, Layout(tp=2), 2) == 2
    assert residual_bytes(fp32w, Layout(pp=2), 2) == 4 and residual_bytes(fp32w, Layout(tp=2), 2) == 4
    assert residual_bytes(cfg, Layout(dp_shard=2), 2) == 2
    assert residual_bytes(cfg, Layout(sp=2), 2) == 2 and residual_bytes(cfg, Layout(dp_shard=2), 4) == 4
    # bf16 stream: 165 KiB per token per layer (1 KiB of it the rotary tables cast per call)
    assert layer_activation_bytes(m, Layout(), 2, "none", r=2) == 169096
    assert layer_activation_bytes(m, Layout(), 2, "full", r=2) == 8192  # the layer input
    # 1M tokens, 32 layers, full recompute under FSDP bf16: 256 GiB of layer inputs
    assert layer_activation_bytes(m, Layout(), 2, "full", r=2) * 32 * 2**20 == 256 * 2**30
    # fp32 stream on one GPU: fp32 layer inputs and mid residuals, 3 + 2 bf16 casts of the norm outputs
    assert layer_activation_bytes(m, Layout(), 2, "full", r=4) == 16384
    assert layer_activation_bytes(m, Layout(), 2, "none", r=4) == 169096 + 2 * 2 * 4096 + (2 + 1) * 2 * 4096
    # Ulysses: wo's input is a second copy of the attention output (the inverse all-to-all's result)
    assert layer_activation_bytes(m, Layout(sp=2), 2, "none", r=2) == 169096 + 2 * 4096


def test_formula_matches_what_autograd_saves_for_one_block_fp32():
    cfg = cfg_for("schedule.dtype=fp32", "model.attn_backend=sdpa")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    block = model.layers["0"]
    B, S = 1, 128
    x = torch.randn(B, S, cfg.model.dim, requires_grad=True)
    cos, sin = model.rotary(torch.arange(S)[None])
    storages = {}

    def pack(t):
        weight = isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter)
        if not weight and t.numel() % S == 0:  # per-token tensors (any layout)
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, cos, sin)
    cos_bytes = 2 * cos.untyped_storage().nbytes()  # the shared rotary tables, not per layer
    measured = (sum(storages.values()) - cos_bytes) / (B * S)
    # on CPU RMSNorm is decomposed and also keeps the normalised x (one more d per norm); CUDA's
    # fused kernel keeps input and rstd only, which is what the formula counts
    predicted = layer_activation_bytes(cfg.model, Layout(), 4, "none") + 2 * 4 * cfg.model.dim
    assert abs(measured - predicted) / predicted < 0.05, (measured, predicted)


def test_formula_counts_what_peri_ln_and_qk_norm_add_to_a_blocks_saved_tensors():
    """Peri-LN's output norms keep their inputs and QK-norm's per-head norms keep q and k before
    rotary: the planner counts them (measured on an H200 as +0.83 GiB per 1B block at 64K)."""

    cfg = cfg_for("schedule.dtype=fp32", "model.attn_backend=sdpa", "model.norm_placement=peri", "model.qk_norm=true")
    m = cfg.model
    torch.manual_seed(0)
    model = build_model(m)
    block = model.layers["0"]
    B, S = 1, 128
    x = torch.randn(B, S, m.dim, requires_grad=True)
    cos, sin = model.rotary(torch.arange(S)[None])
    storages = {}

    def pack(t):
        weight = isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter)
        if not weight and t.numel() % S == 0:
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, cos, sin)
    measured = (sum(storages.values()) - 2 * cos.untyped_storage().nbytes()) / (B * S)
    # the CPU's decomposed RMSNorm also keeps each norm's normalised x: four over d, and q and k
    qd, kvd = m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim
    cpu_extra = 4 * 4 * m.dim + 4 * (qd + kvd)
    predicted = layer_activation_bytes(m, Layout(), 4, "none") + cpu_extra
    assert abs(measured - predicted) / predicted < 0.05, (measured, predicted)
    options = sum(stability_saved_terms(m, Layout(), 4).values())
    assert options > 0.1 * predicted and abs(measured - (predicted - options)) / predicted > 0.1


def test_formula_matches_what_autograd_saves_under_bf16_autocast_with_fp32_params():
    """One GPU with ``parallel.param_dtype=fp32`` (no FSDP): fp32 parameters under bf16 autocast make the residual stream fp32, and
    each linear saves its own bf16 cast of the norm output (3 for wq/wk/wv, 2 for w1/w3)."""
    cfg = cfg_for("schedule.dtype=bf16", "model.attn_backend=sdpa", "parallel.param_dtype=fp32")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    block = model.layers["0"]
    B, S = 1, 128
    x = torch.randn(B, S, cfg.model.dim, requires_grad=True)
    cos, sin = model.rotary(torch.arange(S)[None])
    storages = {}

    def pack(t):
        if S in t.shape:  # per-token tensors; the weights' bf16 copies have no token dimension
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, cos, sin)
    measured = sum(storages.values()) / (B * S)
    r = residual_bytes(cfg, Layout(), 2)
    assert r == 4
    # the CPU's decomposed RMSNorm also keeps the fp32 normalised x (one more 4·d per norm)
    predicted = layer_activation_bytes(cfg.model, Layout(), 2, "none", r=r) + 2 * 4 * cfg.model.dim
    assert abs(measured - predicted) / predicted < 0.02, (measured, predicted)
    # the bf16-stream formula (what the planner used to assume here) misses a fifth of it
    assert layer_activation_bytes(cfg.model, Layout(), 2, "none", r=2) + 2 * 4 * cfg.model.dim < 0.85 * measured


def test_auto_picks_the_fastest_fitting_policy_and_slows_only_as_budgets_shrink():
    """Plentiful memory: no policy at all. Shrinking GPU budgets: the choice always fits, is never
    slower than any fitting row by more than the tie fraction (a tie goes to the least machinery),
    and its predicted step time never falls as the budget shrinks."""
    big = resolve_policy(cfg_for("memory.policy=auto", "memory.gpu_budget_gb=1000"))
    assert big.memory.policy == "manual" and big.memory.recompute == "none" and not big.memory.offload
    assert big.memory.tiled_loss == 0 and not big.memory.optimizer_offload
    over = ["memory.policy=auto", "data.seq_len=4096", "model.vocab_size=4096", "memory.host_budget_gb=1000"]
    rows = plan(cfg_for(*over)).rows
    needs = sorted({r.gpu_total for r in rows}, reverse=True)
    times, names = [], set()
    for need in needs[:: max(1, len(needs) // 12)]:
        budget = (need / planner.GiB + 1) / (1 - planner.RESERVE_FRACTION)  # usable() = budget*(1-f) - 1 GiB
        p = plan(cfg_for(*over, f"memory.gpu_budget_gb={budget}"))
        assert p.chosen is not None and planner.fits(p.chosen, p)
        fastest = min(r.time.total for r in p.rows if planner.fits(r, p))
        assert p.chosen.time.total <= fastest * (1 + planner.TIE_FRACTION)
        times.append(p.chosen.time.total)
        names.add(p.chosen.policy.name)
    assert times == sorted(times) and len(names) > 2, (times, names)  # slower as budgets shrink
    all_names = [r.policy.name for r in rows]
    assert all_names[0] == "none" and any(n.endswith("fsdp-cpu") for n in all_names)
    assert any(n.endswith("optim-cpu") for n in all_names)


def test_selective_with_offload_beats_full_recompute_where_the_host_takes_what_it_keeps():
    """Llama-3-8B, 256K tokens, sp=2 on two H200s (120 GiB host each): selective recomputation
    does not fit on the GPU alone, and offloading what it keeps is chosen over recomputing
    attention (measured on 2026-11-30: 73.5 s against full recompute's 88.7 s)."""
    over = ["data.seq_len=262144", "parallel.sp=2", "schedule.dtype=bf16", "memory.gpu_budget_gb=139",
            "memory.host_budget_gb=120", "memory.policy=auto", "model.max_seq_len=262144"]
    p = plan(load_config("llama3-8b", over), 2)
    assert p.chosen.policy.recompute == "selective" and p.chosen.policy.offload_fraction > 0
    full = min((e for e in p.rows if e.policy.recompute == "full" and planner.fits(e, p)),
               key=lambda e: e.time.total)
    assert full.time.total > 1.15 * p.chosen.time.total
    alone = [e for e in p.rows if e.policy == dataclasses.replace(p.chosen.policy, offload_fraction=0.0)]
    assert alone and not planner.fits(alone[0], p)
    # what selective keeps (its attention outputs) is offloaded too: more host bytes than the inputs
    inputs_only = p.chosen.policy.offload_fraction * 2 * 4096 * 131072 * 32  # bf16, dim 4096, T, layers
    assert p.chosen.host["offloaded activations"] > 1.9 * inputs_only


def test_time_model_error_against_measured_steps_is_within_its_stated_bound():
    from longtrain.memory.step_time import MAX_ERROR, MEASURED

    from longtrain.memory.plan_table import format_time_model_error, time_model_error

    rows = time_model_error()
    assert len(rows) == len(MEASURED) >= 15
    worst = max(rows, key=lambda r: abs(r[2]))
    assert abs(worst[2]) <= MAX_ERROR, format_time_model_error(rows)


def test_nothing_fits_error_names_the_budgets():
    cfg = cfg_for("memory.policy=auto", "memory.gpu_budget_gb=1.01")
    with pytest.raises(ConfigError, match=r"memory\.gpu_budget_gb=1\.01.*host_budget_gb"):
        resolve_policy(cfg)


def test_resolve_policy_uses_world_info_and_leaves_manual_configs_alone():
    cfg = cfg_for("memory.policy=auto", "memory.gpu_budget_gb=1000", "parallel.sp=2", "parallel.dp_shard=-1")
    assert resolve_policy(cfg, {"dp_shard": 2, "sp": 2}).memory.policy == "manual"
    manual = cfg_for("memory.recompute=full")
    assert resolve_policy(manual) is manual


def test_plan_cli_prints_a_table(capsys):
    from longtrain.cli import main

    assert main(["plan", "llama3.2-1b", "data.seq_len=131072", "--gpu-gb", "80"]) == 0
    out = capsys.readouterr().out
    assert "<- chosen" in out and "GPU GiB" in out and "resolves to" in out


def test_offload_fraction_between_quarters_fits_where_no_quarter_does(capsys):
    """Llama-3-8B, 1M tokens, sp=2 on two H200s, 120 GiB host each: 3/4 offloaded leaves too much
    on the GPU, everything offloaded is too much for the host; 0.9 fits both. The plan table
    shows it as the chosen row, with its step time."""
    from longtrain.cli import main

    over = ["data.seq_len=1048576", "parallel.sp=2", "schedule.dtype=bf16", "memory.gpu_budget_gb=139",
            "memory.host_budget_gb=120", "memory.policy=auto"]
    p = plan(load_config("llama3-8b", over), 2)
    fits = lambda e: e.gpu_total <= planner.usable(p.budget) and e.host_total <= p.host_budget
    assert p.chosen is not None and p.chosen.policy.offload_fraction == 0.9, p.chosen.policy.name
    same = [e for e in p.rows if dataclasses.replace(e.policy, offload_fraction=0.9) == p.chosen.policy]
    by_phi = {e.policy.offload_fraction: e for e in same}
    assert not fits(by_phi[0.75]) and not fits(by_phi[1.0]) and not fits(by_phi[0.85])
    assert by_phi[0.75].gpu_total > planner.usable(p.budget) and by_phi[1.0].host_total > p.host_budget
    assert main(["plan", "llama3-8b", *over, "--world", "2"]) == 0
    out = capsys.readouterr().out
    chosen = next(line for line in out.splitlines() if line.endswith("<- chosen"))
    assert chosen.startswith(p.chosen.policy.name + " ") and "offload0.9+" in chosen
    assert f"{p.chosen.time.total:9.2f}" in chosen and "step s" in out


def test_longest_seq_len_fits_and_one_unit_more_does_not(capsys):
    from longtrain.cli import main

    over = ["schedule.dtype=bf16", "memory.gpu_budget_gb=80", "memory.host_budget_gb=64", "parallel.sp=2"]
    cfg = load_config("llama3.2-1b", over)
    n, p = planner.longest_seq_len(cfg, 2)
    unit = 1024 * 2
    assert n > 0 and n % unit == 0 and p.chosen is not None
    at = lambda L: plan(load_config("llama3.2-1b", over + [f"data.seq_len={L}"]), 2).chosen
    assert at(n) is not None and at(n + unit) is None
    assert main(["plan", "llama3.2-1b", *over, "--world", "2", "--longest"]) == 0
    assert f"longest data.seq_len that fits (planner estimate, batch 1): {n} tokens" in capsys.readouterr().out
    tiny_budget = load_config("llama3.2-1b", over + ["memory.gpu_budget_gb=2"])
    assert planner.longest_seq_len(tiny_budget, 2) == (0, None)


def test_per_group_recompute_is_not_modelled_and_says_so():
    cfg = load_config("llama3.2-1b", ["memory.recompute=full", 'memory.recompute_layers=["0-7:selective"]'])
    with pytest.warns(UserWarning, match=r"recompute_layers=\['0-7:selective'\] is not modelled"):
        pol = policy_of(cfg.memory)
    assert pol.recompute == "full"
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no per-group overrides: no warning
        policy_of(load_config("llama3.2-1b", ["memory.recompute=full"]).memory)


def test_looped_ladder_tries_every_core_input_saved_before_recompute_loops():
    # in each group (offload, tiled MLP, optimizer offload, FSDP CPU offload) a looped model's rungs
    # without recompute_loops (each block recomputed once, more for the host) come first
    cfg = load_config("looped-1b", ["schedule.dtype=bf16"])
    ladder = planner.candidate_policies(cfg, planner.layout_from(cfg, 1))
    assert len(ladder) == len(set(ladder))

    def group(p):
        return (p.tiled_mlp > 0, p.optimizer_offload, p.fsdp_cpu_offload)

    for key in {group(p) for p in ladder if p.offload_fraction}:
        loops = [p.recompute_loops for p in ladder if group(p) == key and p.recompute == "full"]
        assert loops == sorted(loops) and loops[0] is False and loops[-1] is True, key
    llama = load_config("llama3.2-1b", ["schedule.dtype=bf16"])
    assert not any(p.recompute_loops for p in planner.candidate_policies(llama, planner.layout_from(llama, 1)))
    # on a 16 GiB card the looped model's leanest choice saves every core input on the host and
    # reaches ~0.96x the plain 20-layer model (planner; with recompute_loops alone it was 0.75x)
    budget = ["schedule.dtype=bf16", "memory.gpu_budget_gb=16", "memory.host_budget_gb=100"]
    n_looped, p_looped = planner.longest_seq_len(load_config("looped-1b", budget), 1)
    n_plain, _ = planner.longest_seq_len(load_config("llama3.2-1b", budget + ["model.n_layers=20"]), 1)
    assert not p_looped.chosen.policy.recompute_loops and p_looped.chosen.policy.fsdp_cpu_offload
    assert n_looped >= 0.9 * n_plain, (n_looped, n_plain)


def test_the_looped_core_stays_gathered_under_fsdp():
    cfg = load_config("looped-1b", ["schedule.dtype=bf16", "data.seq_len=8192"])
    m, pc = cfg.model, count_params(cfg.model)
    lay = planner.layout_from(cfg, 1)
    e = estimate(cfg, lay, Policy("full", tiled_loss=512))
    root = 2 * (pc["embedding"] + pc["head"])  # bf16 unsharded root (embedding, head)
    assert e.phase_terms["backward (first block)"]["fsdp unsharded root"] == root + 2 * m.n_core * pc["block"]


@pytest.mark.parametrize("device,doc_masking,selective", [("cuda", True, False), ("cuda", False, True),
                                                           ("cpu", True, True)])
def test_selective_is_left_out_where_flex_attention_runs_document_masks(device, doc_masking, selective):
    """Compiled FlexAttention (document masks on a GPU) cannot run inside selective recompute's
    dispatch mode (seen on an H200): the planner weighs only none and full there, and a manual
    selective policy on such a model is refused in one line."""
    over = ["data.seq_len=131072", "schedule.dtype=bf16", "memory.gpu_budget_gb=139", "memory.policy=auto",
            f"schedule.device={device}", f"data.doc_masking={str(doc_masking).lower()}"]
    p = plan(load_config("llama3.2-1b", over), 1)
    assert any(e.policy.recompute == "selective" for e in p.rows) == selective
    assert p.chosen is not None


def test_the_selective_rule_follows_the_attention_kernel():
    from longtrain.models.attention import selective_recompute_supported as ok
    assert not ok("flex", "cuda", False) and not ok("auto", "cuda", True)  # compiled flex on a GPU
    assert ok("auto", "cuda", False) and ok("sdpa_cudnn", "cuda", True) and ok("auto", "cpu", True)
