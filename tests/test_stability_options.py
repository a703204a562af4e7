"""The stability options (Peri-LN, QK-norm, z-loss, the looped core's output norm) compute what
one process computes under every parallel layout and memory policy, and z-loss is the formula.

Reuses ``test_parallel_equivalence``'s machinery: the same model built twice from one seed, the
parallel copy fed its slice of the batch, losses, every gradient and the loss after 3 AdamW steps
compared in float32 (relative 2e-5), at learning rate 1e-3 (see the test). The QK-norm weights are replicated under tensor parallelism
while each rank normalises only its own heads, so a plan that forgot to sum their gradients over
tp fails the gradient comparison.

Three combinations are compared in float64 instead (``LAYOUTS_FLOAT64``): Peri-LN on a looped model
under Ulysses, QK-norm after a per-loop LoRA under tensor parallelism, and both options with a gated
delta rule core layer. In float32 they miss 2e-5 with no bug at all: the differences shrink by ~2^29
(the ratio of float32's and float64's epsilons) when the precision rises -- rounding, amplified,
where a missing sum over sp or tp, a parameter left out of the optimizer or stale state would be
off by the same large amount at either precision. Measured (float32 -> float64): a looped model with
Peri-LN, loop norm and QK-norm under sp=2 at lr 1e-2, gradients of step 1 / 2 / 3 off by 4e-7 /
9e-3 / 1.2 (the "second step off" that had it refused) -> 9e-16 / 5e-13 / 2e-10; QK-norm after
LoRA under tp=2, step-1 gradients 4.9e-5 -> 6e-14. Where the amplification comes from: QK-norm divides each
key head by its RMS, and some keys of the LoRA'd core are 14x smaller than the largest, so rounding
in k grows ~14x through ``k_norm`` (one process in float32 is itself 6e-6 off float64 there);
AdamW's normalised updates turn small differences in small gradients into large ones in the
parameters, and three loop iterations amplify them again at every step.
"""

from __future__ import annotations

import torch

from dist_utils import run_distributed
from test_looped_variants_parallel import compare_in_float64
from test_parallel_equivalence import LLAMA, LOOPED, POLICIES, assert_equal_to_single_process, compare_layout

import pytest

STABLE = ["model.norm_placement=peri", "model.qk_norm=true", "optim.z_loss=1e-3"]
LOOPED_STABLE = ["model.loop_norm=true", "model.qk_norm=true", "optim.z_loss=1e-3"]

LAYOUTS = {
    # recompute, offload, tiled MLP and tiled loss (z-loss per chunk) on the parallel model only
    "tp2_sp2_memory_policies": (LLAMA + STABLE + POLICIES, {"tp": 2, "sp": 2}, 4),
    # QK-norm after a per-loop LoRA under tp misses float32's 2e-5 from rounding alone (see the
    # module doc), so this layout runs QK-norm with tp without LoRA; with LoRA it runs in float64
    "looped_loop_norm_tp2_memory_policies": (LOOPED + LOOPED_STABLE + ["model.lora_rank=0"] + POLICIES, {"tp": 2}, 2),
    "looped_lora_loop_norm_sp2": (LOOPED + LOOPED_STABLE, {"sp": 2}, 2),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_stability_options_match_single_process(layout):
    model_over, parallel, world = LAYOUTS[layout]
    # lr 1e-3: Adam's first update is ~lr * sign(g), and a normalised branch whose input is still
    # tiny at init turns float-rounding differences of near-zero gradients into different signs;
    # at 1e-2 that alone moves the loss after 3 steps of a looped model by ~1e-2
    results = run_distributed(compare_layout, world, model_over, parallel, False, False, False, 0.05, 1e-3,
                              init_process_group=False)
    assert_equal_to_single_process(results)
    placements = results[0]["placements"]
    if parallel.get("tp", 1) > 1:  # the per-head norm weights are replicated, not split
        name = ("core." if layout.startswith("looped") else "") + "layers.0.attention.q_norm.weight"
        assert placements[name].endswith("Replicate())") or placements[name].endswith("Replicate(),)"), placements


# float64: the first step (loss, every gradient) equal to rounding (measured <= 7.5e-12; a missing sum
# or a wrong split is off by O(1) here); the loss and gradient norms of the 3 AdamW steps at lr 1e-2
# within 1e-6 (measured <= 7e-8; the refused layouts were 10-42% off in float32)
STEP1_RTOL, AFTER_STEPS_RTOL = 1e-10, 1e-6
GDN = ["model.core_attention=[gdn,full]"]
GDN_STABLE = LOOPED + GDN + ["model.norm_placement=peri", "model.qk_norm=true"]

LAYOUTS_FLOAT64 = {
    # Peri-LN's output norms inside the looped core (used once per iteration), under Ulysses
    "looped_peri_sp2": (LOOPED + ["model.norm_placement=peri", "optim.z_loss=1e-3"], {"sp": 2}, 2, AFTER_STEPS_RTOL),
    # QK-norm on q and k that a per-loop LoRA changed, heads split over tp
    "looped_lora_qk_norm_peri_tp2": (LOOPED + ["model.qk_norm=true", "model.norm_placement=peri"], {"tp": 2}, 2,
                                     AFTER_STEPS_RTOL),
    # a gated delta rule core layer with both options: Peri-LN wraps it, QK-norm leaves it alone;
    # Ulysses around the recurrence (after 3 steps: loss 7e-9, gradient norms 7e-8)
    "looped_gdn_peri_qk_norm_sp2": (GDN_STABLE, {"sp": 2}, 2, AFTER_STEPS_RTOL),
    # the tp plan has no q_norm / k_norm for the gdn layer. Its first step matches to 7.5e-12, but
    # the gdn core under tp amplifies float64 rounding ~100x per step even with plain SGD, and more
    # with AdamW (loss after 3 steps 1.2e-4, gradient norms 2.9e-4; the first step's differences are
    # ~2^29 times larger in float32, so rounding); a 10% error still fails
    "looped_gdn_peri_qk_norm_tp2": (GDN_STABLE, {"tp": 2}, 2, 1e-2),
}


@pytest.mark.parametrize("layout", list(LAYOUTS_FLOAT64))
def test_stability_options_match_single_process_in_float64(layout):
    model_over, parallel, world, after_steps_rtol = LAYOUTS_FLOAT64[layout]
    results = run_distributed(compare_in_float64, world, model_over, parallel, init_process_group=False)
    for rank, r in enumerate(results):
        msg = f"rank {rank}, {r['describe']}: " + str({k: v for k, v in r.items() if k != "placements"})
        assert max(r["loss1"], r["grad"]) < STEP1_RTOL and max(r["loss_after_3"], r["norm"]) < after_steps_rtol, msg
        assert r["clipped"] and r["losses"][1][-1] < r["losses"][1][0] and r["unwaited"] == 0, msg
    if parallel.get("tp", 1) > 1:  # the per-head norm weights replicated, the LoRA of wq split like wq
        placements = results[0]["placements"]
        assert placements["core.layers.1.attention.q_norm.weight"] == "(Replicate(),)", placements
        assert placements["core.lora.1_attention_wq.B"] == "(Shard(dim=1),)", placements


def _tiny(*over):
    from longtrain.config import load_config
    from longtrain.models import build_model

    cfg = load_config(None, LLAMA + ["data.seq_len=32"] + list(over))
    torch.manual_seed(0)
    return cfg, build_model(cfg.model)


def test_z_loss_adds_squared_log_normaliser_of_labelled_tokens_in_training_only():
    cfg, model = _tiny("optim.z_loss=1e-2")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=g)
    labels = tokens.roll(-1, dims=1)
    labels[:, -3:] = -100
    plain = model(tokens, labels=labels)
    model.set_z_loss(1e-2)
    with_z = model(tokens, labels=labels)
    logits = model(tokens).float()
    keep = labels != -100
    expect = plain + 1e-2 * torch.logsumexp(logits, -1)[keep].square().sum()
    torch.testing.assert_close(with_z, expect, rtol=1e-6, atol=1e-6)
    assert with_z > plain
    model.eval()  # evaluation reports plain cross-entropy
    torch.testing.assert_close(model(tokens, labels=labels), plain)


def test_options_add_their_norm_weights_to_the_parameter_count():
    for over in ([], ["model.norm_placement=peri"], ["model.qk_norm=true"],
                 ["model.norm_placement=peri", "model.qk_norm=true"]):
        cfg, model = _tiny(*over)
        assert model.param_counts()["total"] == sum(p.numel() for p in model.parameters()), over
    base = _tiny()[1].param_counts()["block"]
    cfg, model = _tiny("model.norm_placement=peri", "model.qk_norm=true")
    assert model.param_counts()["block"] == base + 2 * cfg.model.dim + 2 * cfg.model.head_dim
    from longtrain.config import load_config
    from longtrain.models import build_model

    for over in (["model.loop_norm=true", "model.qk_norm=true"],
                 # a gdn core layer: Peri-LN adds its two output norms, QK-norm adds nothing
                 GDN + ["model.norm_placement=peri", "model.qk_norm=true"]):
        cfg = load_config(None, LOOPED + ["data.seq_len=32"] + over)
        model = build_model(cfg.model)
        assert model.param_counts()["total"] == sum(p.numel() for p in model.parameters()), over
    gdn = model.core.layers["0"]
    assert gdn.attention_out_norm is not None and not hasattr(gdn.attention, "q_norm")
