"""The stability options (Peri-LN, QK-norm, z-loss, the looped core's output norm) compute what
one process computes under every parallel layout and memory policy, and z-loss is the formula.

Reuses ``test_parallel_equivalence``'s machinery: the same model built twice from one seed, the
parallel copy fed its slice of the batch, losses, every gradient and the loss after 3 AdamW steps
compared in float32 (relative 2e-5), at learning rate 1e-3 (see the test). The QK-norm weights are replicated under tensor parallelism
while each rank normalises only its own heads, so a plan that forgot to sum their gradients over
tp fails the gradient comparison.
"""

from __future__ import annotations

import torch

from dist_utils import run_distributed
from test_parallel_equivalence import LLAMA, LOOPED, POLICIES, assert_equal_to_single_process, compare_layout

import pytest

STABLE = ["model.norm_placement=peri", "model.qk_norm=true", "optim.z_loss=1e-3"]
LOOPED_STABLE = ["model.loop_norm=true", "model.qk_norm=true", "optim.z_loss=1e-3"]

LAYOUTS = {
    # recompute, offload, tiled MLP and tiled loss (z-loss per chunk) on the parallel model only
    "tp2_sp2_memory_policies": (LLAMA + STABLE + POLICIES, {"tp": 2, "sp": 2}, 4),
    # QK-norm after a per-loop LoRA under tp is refused (config.validate), so the looped layout
    # runs QK-norm with tp (no LoRA) and the LoRA under sp
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

    cfg = load_config(None, LOOPED + ["data.seq_len=32", "model.loop_norm=true", "model.qk_norm=true"])
    model = build_model(cfg.model)
    assert model.param_counts()["total"] == sum(p.numel() for p in model.parameters())


def test_qk_norm_after_looped_lora_under_tp_is_refused_with_one_line():
    from longtrain.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="model.qk_norm=true with model.lora_rank=2 under parallel.tp=2"):
        load_config(None, LOOPED + ["data.seq_len=32", "model.qk_norm=true", "parallel.tp=2"])
    with pytest.raises(ConfigError, match="model.norm_placement=peri on a looped model under parallel.sp=2"):
        load_config(None, LOOPED + ["data.seq_len=32", "model.norm_placement=peri", "parallel.sp=2"])
