"""σReparam (``model.sigma_reparam``, ``models/sigma_reparam.py``): the initial function is the
plain model's, sigma is the spectral norm, every parallel layout computes what one process
computes (FSDP2, tensor parallel, pipeline stages, under recompute), resume is exact and the export
folds W_hat.

The layouts reuse ``test_parallel_equivalence``'s comparison (same tolerances: relative 2e-5 on
losses, gradients -- gamma's included -- and norms, three AdamW steps; one layout in float64, see
LAYOUTS); the singular-vector buffers u, v are compared too: bitwise between ranks, since every rank
must hold the same estimates without exchanging them, and against one process to absolute 1e-4 (unit
vectors; a singular vector moves by up to ~1/(sigma_1 - sigma_2) times a weight change, and the
float32 layouts' u, v differ from one process by ~1e-5 after three steps, measured). A gated delta
rule core layer (its own choice of reparameterised linears, ``GatedDeltaNet``) is compared under tp
in float64 with tighter tolerances (``GDN_STEP1_RTOL``, ``GDN_AFTER_STEPS_RTOL``; its test says why).
"""

from __future__ import annotations

import pytest
import torch

from dist_utils import run_distributed
from test_parallel_equivalence import LLAMA, LOOPED, POLICIES, assert_equal_to_single_process, compare_layout

SIGMA = ["model.sigma_reparam=true"]

LAYOUTS = {
    # FSDP2 over 2 ranks with full recompute: the recomputed forward must see the step's u, v
    "dp_shard2_recompute": (LLAMA + SIGMA + ["memory.recompute=full"], {"dp_shard": 2}, 2, False),
    # tensor parallel: column- and row-split weights, replicated gamma, u, v; every memory policy
    "tp2_memory_policies": (LLAMA + SIGMA + POLICIES, {"tp": 2}, 2, False),
    # a looped core (its linears run 3 times a step, per-loop LoRA on top) under FSDP2, with every
    # iteration recomputed
    "looped_lora_dp_shard2_recompute_loops": (LOOPED + SIGMA + ["memory.recompute_loops=true"], {"dp_shard": 2}, 2,
                                              False),
    # the looped core with LoRA under tp, recomputed, in float64 (``compare_in_float64``): in float32
    # the first gradients agree (<= 3.3e-6; one gamma's 4.3e-5, where one process's float32 gamma
    # gradient is itself 3.4e-5 off float64: one sum over the whole weight, with cancellation) but
    # AdamW's sign-like first update amplifies rounding to 5e-5 in the third step's grad norm
    # (measured); in float64 every error is < 1e-12, and plain SGD in float32 stays < 3e-7
    "looped_lora_tp2_recompute_float64": (LOOPED + SIGMA + ["memory.recompute=full"], {"tp": 2}, 2, True),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sigma_reparam_matches_single_process(layout):
    from test_looped_variants_parallel import compare_in_float64

    model_over, parallel, world, float64 = LAYOUTS[layout]
    results = run_distributed(compare_in_float64 if float64 else compare_layout, world, model_over, parallel,
                              init_process_group=False)
    assert_equal_to_single_process(results)  # every gradient, gamma's included
    for r in results:
        assert any(k.endswith(".gamma") for k in r["grad_errors"]), "no σReparam gains: the option did not apply"
        assert r["sigma_buffer_err"] < 1e-4, r["sigma_buffer_err"]
        for name, b in r["sigma_buffers"].items():
            assert b == results[0]["sigma_buffers"][name], f"{name} differs between ranks"
    if "tp" in parallel:
        placements = results[0]["placements"]
        prefix = "core." if layout.startswith("looped") else ""
        assert placements[f"{prefix}layers.0.attention.wq.weight"].endswith("Shard(dim=0),)"), placements
        assert placements[f"{prefix}layers.0.attention.wq.gamma"].endswith("Replicate(),)"), placements


# a gated delta rule core layer (layer 0 of the core; layer 1 is attention), per-loop LoRA on both
GDN_CORE = LOOPED + SIGMA + ["model.core_attention=[gdn,full]"]
# float64, first step (loss, every gradient, gamma's included) / the 3 AdamW steps (loss after them,
# gradient norms) and u, v after them
GDN_STEP1_RTOL, GDN_AFTER_STEPS_RTOL = 1e-10, 1e-8


def test_sigma_reparam_with_a_gdn_core_under_tp_matches_single_process_in_float64():
    """gdn's wq, wk, wv, wg split by head with their gamma, u, v replicated (``ColumnParallel``),
    wo row-split, the plain gates wa (weight and bias) and wb split by head; one power iteration
    per step on the sharded weights, reduced over tp.

    Float64 with AdamW at lr 3e-3, because float32 rounding alone exceeds float32's 2e-5 here:
    in float32 the first step agrees (loss 2e-7, gradients 9.8e-5 -- a gamma's: one sum over a
    whole weight, with cancellation), but after 3 steps the loss is 2.3e-3 off, the gradient norms
    3.4e-2 and u, v 5.4e-2 -- under sp=2 as well (4.5e-3, 6.0e-2, 1.7e-2), where no weight is
    split at all. In float64 the first step agrees to 5.3e-13 and after 3 steps the loss to 1e-11
    and u, v to 3e-11 (tp=2; tp=2 x sp=2 on 4 ranks the same, sp=2 4e-14), while ONE process whose
    weights are perturbed by a relative 1e-15 itself moves by 4.5e-11 (loss) and 1.4e-10 (u, v)
    after the same steps: rounding, amplified by AdamW's normalised updates (a wrong split or a
    missing sum is off by the same large amount at either precision). lr 3e-3, not the suite's
    1e-2: at 1e-2 this model's loss on the first batch rises over the 3 steps with or without
    σReparam (4.603 -> 4.698 without), so "training lowers the loss" could not be checked.
    """
    from test_looped_variants_parallel import compare_in_float64

    results = run_distributed(compare_in_float64, 2, GDN_CORE, {"tp": 2}, False, False, False, 0.05, 3e-3,
                              init_process_group=False)
    for rank, r in enumerate(results):
        msg = f"rank {rank}, {r['describe']}: " + str({k: v for k, v in r.items()
                                                      if k not in ("placements", "sigma_buffers", "grad_errors")})
        assert max(r["loss1"], r["grad"]) < GDN_STEP1_RTOL, msg
        assert max(r["loss_after_3"], r["norm"], r["sigma_buffer_err"]) < GDN_AFTER_STEPS_RTOL, msg
        assert r["clipped"] and r["losses"][1][-1] < r["losses"][1][0] and r["unwaited"] == 0, msg
        assert r["sigma_buffers"] == results[0]["sigma_buffers"], f"rank {rank}: u, v differ between ranks"
    placements = results[0]["placements"]
    gdn = "core.layers.0.attention."
    for name in ("wq", "wk", "wv", "wg"):
        assert placements[gdn + name + ".weight"] == "(Shard(dim=0),)", placements
        assert placements[gdn + name + ".gamma"] == "(Replicate(),)", placements
    assert placements[gdn + "wo.weight"] == "(Shard(dim=1),)" and placements[gdn + "wo.gamma"] == "(Replicate(),)"
    for name in ("wa.weight", "wa.bias", "wb.weight"):  # plain gates, split by head
        assert placements[gdn + name] == "(Shard(dim=0),)", placements
    assert not any(k.startswith((gdn + "wa.", gdn + "wb.")) and k.endswith(".gamma") for k in placements)


def test_sigma_reparam_on_pipeline_stages_matches_single_process():
    """A looped core on both of two stages (each stage's copy keeps its own u, v, equal because the
    copies are), 1F1B with full recompute: the micro-batches' forwards run before their backwards,
    which re-run them, so each must see the step's one u, v."""
    from test_pipeline_equivalence import LOOPED as PP_LOOPED
    from test_pipeline_equivalence import assert_equal_to_single_process as assert_pipeline_equal
    from test_pipeline_equivalence import compare_pipeline

    results = run_distributed(compare_pipeline, 2, PP_LOOPED + SIGMA + ["memory.recompute=full"],
                              {"pp": 2, "pp_schedule": "1f1b"}, init_process_group=False)
    assert results[0]["core_stages"] == [0, 1], results[0]["pipeline"]
    assert any(n.endswith(".gamma") for n in results[0]["names"])
    assert_pipeline_equal(results)


def _model(over: list[str], sigma: bool, seed: int = 0):
    from longtrain.config import load_config
    from longtrain.models import build_model

    cfg = load_config(None, over + ["data.seq_len=32"] + (SIGMA if sigma else []))
    torch.manual_seed(seed)
    return cfg, build_model(cfg.model)


def _sigma_layers(model):
    from longtrain.models.sigma_reparam import SigmaReparamLinear

    return {name: m for name, m in model.named_modules() if isinstance(m, SigmaReparamLinear)}


GDN = ["model.core_attention=[gdn,full]"]


@pytest.mark.parametrize("arch", ["llama", "looped", "looped_gdn"])
def test_initial_function_is_the_plain_models(arch):
    over = {"llama": LLAMA, "looped": LOOPED, "looped_gdn": LOOPED + GDN}[arch]
    _, plain = _model(over, False)
    cfg, model = _model(over, True)
    layers = _sigma_layers(model)
    # every block linear (7 per attention block; 8 per gdn block: wq, wk, wv, wg, wo and the MLP,
    # not the gates wa, wb), nothing outside the blocks (embedding, head, re-injection)
    n_gdn = sum(r.mixer == "gdn" for r in model.blocks())
    assert n_gdn == (arch == "looped_gdn")
    assert len(layers) == 7 * len(model.blocks()) + n_gdn, sorted(layers)
    assert all(".attention." in n or ".feed_forward." in n for n in layers), layers
    assert not any(n.endswith((".wa", ".wb")) for n in layers), layers
    counts = model.param_counts()  # models.costs.count_params: the gains counted exactly
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["block"] == max(sum(p.numel() for p in r.module.parameters()) for r in model.blocks())
    # same parameter names and values as the plain model (gamma, u, v added), so the same init
    sigma_only = {n for n in model.state_dict() if n.endswith((".gamma", ".u", ".v"))}
    assert set(model.state_dict()) - sigma_only == set(plain.state_dict())
    for name, t in plain.state_dict().items():
        assert torch.equal(model.state_dict()[name], t), name
    x = torch.randint(0, cfg.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))  # gamma = the init estimate of sigma: a factor of exactly 1
        model.eval()
        plain.eval()
        assert torch.equal(model(x), plain(x))


def test_gdn_decay_keeps_its_time_constants_under_sigma_reparam():
    """``reset_decay``'s documented init: with no input, the state's time constant 1/(1 - alpha)
    runs log-uniformly from 4 to 1024 tokens across heads -- ``wa`` (weight and bias) stays a
    plain linear, so σReparam neither rescales its weight nor touches the bias."""
    import math

    from longtrain.models.sigma_reparam import SigmaReparamLinear

    cfg, model = _model(LOOPED + GDN, True)
    gdn = model.core.layers["0"].attention
    assert type(gdn.wa) is torch.nn.Linear and type(gdn.wb) is torch.nn.Linear
    assert isinstance(gdn.wq, SigmaReparamLinear) and isinstance(gdn.wo, SigmaReparamLinear)
    alpha = torch.exp(-torch.nn.functional.softplus(gdn.wa(torch.zeros(1, cfg.model.dim)))).flatten()
    tau = torch.logspace(math.log10(4.0), math.log10(1024.0), cfg.model.n_heads)
    torch.testing.assert_close(1 / (1 - alpha.detach()), tau, rtol=1e-4, atol=0)


def test_sigma_converges_to_the_spectral_norm_once_per_step():
    from longtrain.models.sigma_reparam import begin_train_step

    cfg, model = _model(LLAMA, True)
    layers = _sigma_layers(model)
    for name, lin in layers.items():
        exact = torch.linalg.matrix_norm(lin.weight.detach(), 2)
        est = lin.sigma().detach()
        assert est <= exact * (1 + 1e-6), name  # u^T W v of unit vectors never exceeds ||W||_2
        torch.testing.assert_close(lin.gamma.detach(), est.reshape(1))
        lin.power_iteration_(300)
        torch.testing.assert_close(lin.sigma().detach(), exact, rtol=1e-4, atol=0)
    # one power iteration per step, whatever the number of forwards (micro-batches, loop
    # iterations, recompute); none in evaluation or without begin_train_step
    lin = layers["layers.0.attention.wq"]
    with torch.no_grad():
        lin.weight.add_(0.05 * torch.randn_like(lin.weight))  # a moved weight: u, v are stale
    u0 = lin.u.clone()
    x = torch.randint(0, cfg.model.vocab_size, (2, 32))
    with torch.no_grad():
        model(x)
        assert torch.equal(lin.u, u0)
        model.eval()
        begin_train_step(model)
        model(x)
        assert torch.equal(lin.u, u0)
        model.train()
        model(x)
        once = lin.u.clone()
        model(x)
    assert not torch.equal(once, u0) and torch.equal(lin.u, once)
    lin.u.copy_(u0)
    lin.power_iteration_(1)
    assert torch.equal(lin.u, once)


def test_resume_is_exact_and_checkpoints_hold_gamma_u_v(tmp_path):
    from test_ckpt_resume import check

    from longtrain.trainer.checkpoint_format import load_full_model_state

    check(tmp_path, 1, tuple(SIGMA))  # losses after resuming from step 3 bitwise those of a straight run
    state = load_full_model_state(tmp_path / "straight" / "checkpoints" / "step-8")
    for key in ("gamma", "u", "v"):
        assert f"layers.1.feed_forward.w2.{key}" in state, sorted(state)


def test_export_folds_gamma_over_sigma_into_plain_llama_weights(tmp_path):
    transformers = pytest.importorskip("transformers")
    from longtrain.cli import main
    from longtrain.config import load_config
    from longtrain.models import build_model
    from longtrain.models.sigma_reparam import begin_train_step
    from longtrain.parallel.mesh import ParallelDims
    from longtrain.trainer.checkpoint import Checkpointer

    cfg = load_config(None, LLAMA + SIGMA + ["data.seq_len=32", f"checkpoint.dir={tmp_path / 'ckpt'}"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():  # weights moved and gains away from sigma, then one power iteration
        for p in model.parameters():
            p.mul_(1 + 0.3 * torch.rand_like(p))
        begin_train_step(model)
        model(torch.randint(0, 64, (1, 8)))
    scales = [float(m.scale().detach()) for m in _sigma_layers(model).values()]
    assert min(abs(s - 1) for s in scales) > 1e-3, scales  # the fold has something to fold
    Checkpointer(cfg, ParallelDims.from_config(cfg, 1), tmp_path, model=model).save(sync=True)
    assert main(["ckpt", "export-hf", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 0
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    x = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model.eval()(x), atol=1e-5, rtol=0)


def test_init_from_hf_is_refused_with_one_line_and_gdn_cores_are_accepted():
    from longtrain.config import ConfigError, load_config

    base = ["data.seq_len=32"] + SIGMA
    with pytest.raises(ConfigError, match="model.sigma_reparam=true with checkpoint.init_from_hf") as e:
        load_config(None, LLAMA + ["checkpoint.init_from_hf=/nowhere"] + base)
    assert "\n" not in str(e.value)
    assert load_config(None, LOOPED + ["model.core_attention=[full, gdn]"] + base).model.sigma_reparam
