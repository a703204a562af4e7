"""Stage splitting without processes: balancing, user boundaries, the errors, and that the stage
models run in sequence compute exactly the whole model."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from longtrain.config import ConfigError, load_config
from longtrain.models import build_model, units_of
from longtrain.models.units import unit_cost
from longtrain.parallel.pipeline_split import (
    balance,
    build_stage_model,
    n_pipeline_stages,
    plan_stages,
    stage_boundaries,
    virtual_layers,
)

TINY = ["model.vocab_size=64", "model.dim=32", "model.n_heads=4", "model.n_kv_heads=2",
        "model.ffn_dim=64", "model.max_seq_len=64", "data.seq_len=16", "data.batch_size=4"]


def cfg_of(*over):
    return load_config(None, TINY + list(over))


def _brute_force(costs, k, first, last):
    n = len(costs)
    best = None
    for cuts in itertools.combinations(range(1, n), k - 1):
        edges = [0, *cuts, n]
        runs = [sum(costs[a:b]) + (first if a == 0 else 0) + (last if b == n else 0)
                for a, b in zip(edges, edges[1:])]
        key = (max(runs), sum(r * r for r in runs))
        if best is None or key < best[0]:
            best = (key, list(cuts))
    return best[0]


def test_balance_is_optimal_against_brute_force():
    rng = random.Random(0)
    for _ in range(60):
        n, k = rng.randint(2, 9), rng.randint(1, 4)
        if k > n:
            continue
        costs = [rng.choice([1.0, 2.0, 3.0, 0.5]) for _ in range(n)]
        first, last = rng.choice([0.0, 1.5]), rng.choice([0.0, 2.5])
        cuts = balance(costs, k, first, last)
        edges = [0, *cuts, n]
        runs = [sum(costs[a:b]) + (first if a == 0 else 0) + (last if b == n else 0)
                for a, b in zip(edges, edges[1:])]
        want_max, want_sq = _brute_force(costs, k, first, last)
        assert max(runs) == pytest.approx(want_max) and sum(r * r for r in runs) == pytest.approx(want_sq)


def test_balancing_llama_moves_a_layer_off_the_head_stage_when_the_head_is_expensive():
    cheap = cfg_of("model.arch=llama", "model.n_layers=8", "parallel.pp=2")
    assert stage_boundaries(cheap, 2) == [4]  # the head is small next to 4 blocks: 4 / 4
    big_vocab = cfg_of("model.arch=llama", "model.n_layers=8", "parallel.pp=2", "model.vocab_size=576")
    m = big_vocab.model
    head = units_of(m)[-1]
    assert 1.5 < unit_cost(m, head, 16) / unit_cost(m, virtual_layers(m)[0], 16) < 2.5  # the head ~ two blocks
    assert stage_boundaries(big_vocab, 2) == [5]  # so the last stage takes fewer blocks: 5 / 3


def test_looped_unrolls_core_iterations_and_spreads_them_over_stages():
    cfg = cfg_of("model.arch=looped", "model.n_prelude=1", "model.n_core=2", "model.n_coda=1",
                 "model.loops=4", "parallel.pp=2")
    m = cfg.model
    units = virtual_layers(m)
    assert [u.name for u in units] == ["prelude.0", "core@0", "core@1", "core@2", "core@3", "coda.0"]
    assert unit_cost(m, units[1], 16) == 2 * unit_cost(m, units[0], 16)  # an iteration runs both core blocks
    specs = plan_stages(cfg, 2)
    assert [[u.name for u in s.units] for s in specs] == [["prelude.0", "core@0", "core@1"],
                                                          ["core@2", "core@3", "coda.0"]]
    # later iterations re-inject the prelude output: the first stage sends [h, e]
    model = build_model(m)
    sent = model.forward_units(specs[0].run, torch.randint(0, 64, (2, 16)))
    assert sent.shape == (2, 16, 2 * m.dim)


def test_user_boundaries_and_their_errors():
    cfg = cfg_of("model.arch=llama", "model.n_layers=4", "parallel.pp=2", "parallel.pp_boundaries=[1]")
    assert [[u.name for u in s.units] for s in plan_stages(cfg, 2)] == [["layers.0"], ["layers.1", "layers.2", "layers.3"]]
    for bad in ("[0]", "[4]", "[1, 2]"):
        with pytest.raises(ConfigError, match="pp_boundaries"):
            stage_boundaries(cfg_of("model.arch=llama", "model.n_layers=4", "parallel.pp=2",
                                    f"parallel.pp_boundaries={bad}"), 2)
    with pytest.raises(ConfigError, match="virtual layers"):
        stage_boundaries(cfg_of("model.arch=llama", "model.n_layers=3", "parallel.pp=2",
                                "parallel.pp_schedule=interleaved_1f1b"), 4)


def test_pipeline_refuses_sampled_loop_counts_and_truncated_backprop():
    from longtrain.parallel.pipeline_split import check_pipeline_config

    with pytest.raises(ConfigError, match="loop_sampling=uniform"):
        check_pipeline_config(cfg_of("model.arch=looped", "model.loop_sampling=uniform", "parallel.pp=2"))
    with pytest.raises(ConfigError, match="backprop_loops"):
        check_pipeline_config(cfg_of("model.arch=looped", "model.backprop_loops=2", "parallel.pp=2"))
    check_pipeline_config(cfg_of("model.arch=looped", "model.loop_sampling=uniform", "parallel.pp=1"))


@pytest.mark.parametrize("arch,extra,n_stages", [
    ("llama", ["model.n_layers=4"], 2),
    ("llama", ["model.n_layers=4", "model.tie_embeddings=true"], 4),
    ("looped", ["model.loops=4", "model.lora_rank=2", "model.reinject=concat"], 2),
    ("looped", ["model.loops=4", "model.lora_rank=2", "model.reinject=add"], 5),
    ("looped", ["model.loops=3", "model.n_prelude=0", "model.reinject=add"], 3),
])
def test_stage_models_in_sequence_equal_the_whole_model(arch, extra, n_stages):
    cfg = cfg_of(f"model.arch={arch}", *extra)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    if arch == "looped":
        with torch.no_grad():
            for lora in model.core.lora.values():
                lora.B.normal_(std=0.05)
    tokens = torch.randint(0, 64, (2, 16))
    pos = torch.arange(16).expand(2, 16)
    docs = (torch.arange(16) >= 7).long().expand(2, 16)
    want = model(tokens, pos, docs)
    x = (tokens,)
    for spec in plan_stages(cfg, n_stages):
        stage = build_stage_model(model, spec, torch.device("cpu"))
        out = stage(*x, position_ids=pos, doc_ids=docs)
        x = out if isinstance(out, tuple) else (out,)
        # a stage holds only its own parts, under the whole model's names
        names = {n for n, _ in stage.named_parameters()}
        assert ("tok_embeddings.weight" in names) == spec.is_first
        assert all(n.split(".")[0] != "layers" or f"layers.{n.split('.')[1]}" in
                   {u.name for u in spec.units} for n in names)
    torch.testing.assert_close(x[0], want, rtol=0, atol=0)


def test_stage_count_per_schedule():
    assert n_pipeline_stages(cfg_of("parallel.pp=2", "parallel.pp_schedule=1f1b").parallel) == 2
    assert n_pipeline_stages(cfg_of("parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b",
                                    "parallel.pp_virtual_stages=3").parallel) == 6
