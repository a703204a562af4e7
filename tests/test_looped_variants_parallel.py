"""The looped variants of issue 24 compute, under every parallel layout, what one process computes.

One looped model with all of them at once -- a core of one attention and one gated delta rule
layer (``model.core_attention``), two hyper-connected streams (``model.hyper_streams``), per-loop
LoRA and ``concat`` re-injection -- through ``test_parallel_equivalence.compare_layout`` (same
seed, same global batch, step-1 loss and every gradient, clipped norm, loss after 3 AdamW steps).

In float64 (the head's cross-entropy too), with tolerances of 1e-6 on losses and 1e-7 on
gradients: in float32 the chunked recurrence's triangular solves and
the hyper-connection reductions (sums over every token, with cancellation) differ between layouts
by ~1e-5 from summation order alone, and AdamW's normalised steps amplify that in parameters
with near-zero gradients -- above the float32 suite's 2e-5 without any bug. In float64 any real
difference (a wrong shard, a missing gradient sum, an unreset document state) stands out by many
orders of magnitude. FSDP's compute dtype is raised to float64 the same way (``_DTYPES``).
Tensor parallel must really shard the gdn projections by head; Ulysses swaps the gates with q,
k, v; the memory policies wrap the new layers like the others.
"""

from __future__ import annotations

import pytest

from dist_utils import run_distributed
from test_parallel_equivalence import LOOPED, POLICIES, SELECTIVE_OFFLOAD, compare_layout

LOSS_RTOL = 1e-6  # the loss after 3 AdamW steps carries their amplified rounding
GRAD_RTOL = 1e-7

VARIANTS = LOOPED + ["model.core_attention=[gdn,full]", "model.hyper_streams=2"]

LAYOUTS = {
    # heads split over tp, then over sp for attention and the recurrence alike; packed documents;
    # FSDP over sp with full recompute, half the inputs offloaded, tiled MLP and loss
    "tp2_sp2_documents_memory_policies": (VARIANTS + POLICIES, {"tp": 2, "sp": 2}, 4, True),
    # selective recompute with what it keeps offloaded, under Ulysses
    "sp2_selective_offload": (VARIANTS + SELECTIVE_OFFLOAD, {"sp": 2}, 2, False),
}


def compare_in_float64(*args):
    """``compare_layout`` with every tensor float64 (runs in each spawned rank)."""
    import torch

    import longtrain.parallel.fsdp as fsdp

    torch.set_default_dtype(torch.float64)
    fsdp._DTYPES["fp32"] = torch.float64  # FSDP's compute and reduce dtype for parallel.*_dtype=fp32
    return compare_layout(*args)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gdn_hyper_looped_model_matches_single_process(layout):
    model_over, parallel, world, docs = LAYOUTS[layout]
    results = run_distributed(compare_in_float64, world, model_over, parallel, docs, init_process_group=False)
    for rank, r in enumerate(results):
        msg = f"rank {rank}, {r['describe']}: " + str({k: v for k, v in r.items() if k != "placements"})
        assert max(r["loss1"], r["loss_after_3"]) < LOSS_RTOL and max(r["norm"], r["grad"]) < GRAD_RTOL, msg
        # clipping binds, the 3 steps moved the model, no collective left unwaited
        assert r["clipped"] and abs(r["losses"][1][-1] - r["losses"][1][0]) > 1e-3 and r["unwaited"] == 0, msg
    placements = results[0]["placements"]
    if parallel.get("tp", 1) > 1:  # the gdn layer's per-head projections sharded by head
        for name in ("wq", "wa", "wb", "wg"):
            assert placements[f"core.layers.0.attention.{name}.weight"].endswith("Shard(dim=0))"), placements
        assert placements["core.layers.0.attention.wa.bias"].endswith("Shard(dim=0))"), placements
        assert placements["hyper.mix"].endswith("Replicate())"), placements


def compare_pipeline_in_float64(*args):
    import torch

    from test_pipeline_equivalence import compare_pipeline

    torch.set_default_dtype(torch.float64)
    return compare_pipeline(*args)


def test_gdn_hyper_looped_model_on_two_pipeline_stages_matches_single_process():
    """The core's iterations on both stages: what crosses the cut is the hyper streams and the
    prelude output side by side ([B, S, (n + 1) d]); the stage after the loop reduces them."""
    from test_pipeline_equivalence import LOOPED as PP_LOOPED

    over = PP_LOOPED + ["model.core_attention=[gdn,full]", "model.hyper_streams=2"]
    results = run_distributed(compare_pipeline_in_float64, 2, over, {"pp": 2, "pp_schedule": "1f1b"},
                              init_process_group=False)
    assert results[0]["core_stages"] == [0, 1], results[0]["pipeline"]
    for rank, r in enumerate(results):
        msg = f"rank {rank}: {r}"
        assert max(r["loss"], r["norm1"], r["norm"], r["grad"]) < LOSS_RTOL, msg
        assert r["clipped"], msg
