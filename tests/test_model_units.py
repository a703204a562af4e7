"""The model describes itself: its units cover it, running them is running the model, its costs
from the config are its built counts, and FSDP takes its units from it (single process, CPU)."""

import pytest
import torch
import torch.nn as nn

from longtrain.config import load_config
from longtrain.models import build_model, costs, units_of
from longtrain.models.llama import Block, LMHead
from longtrain.models.units import BLOCK, EMBEDDING, HEAD, BlockRef, DescribedModel, ShardUnit, Unit, unit_cost
from longtrain.parallel.fsdp import fsdp_units

torch.set_num_threads(1)

SHAPES = {
    "llama": ["model.arch=llama", "model.n_layers=3"],
    "llama_tied": ["model.arch=llama", "model.n_layers=2", "model.tie_embeddings=true"],
    "looped_concat_lora": ["model.arch=looped", "model.loops=3", "model.lora_rank=2", "model.reinject=concat"],
    "looped_no_prelude": ["model.arch=looped", "model.n_prelude=0", "model.loops=2", "model.reinject=add"],
    "looped_truncated": ["model.arch=looped", "model.loops=4", "model.backprop_loops=2", "model.lora_rank=2"],
}


def model_cfg(name):
    over = ["model.dim=32", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=48", "model.vocab_size=61"]
    return load_config(None, over + SHAPES[name]).model


def built(name):
    torch.manual_seed(0)
    model = build_model(model_cfg(name))
    with torch.no_grad():  # non-zero LoRA deltas, so a wrong iteration would show
        for point in model.lora_points():
            point.module.B.normal_(std=0.1)
    return model


def owner(name: str, modules: set) -> list:
    return [m for m in modules if name.startswith(m + ".")]


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_units_cover_every_parameter_exactly_once(name):
    model = built(name)
    units = model.units()
    assert units == units_of(model.cfg)  # the config alone describes the same model
    assert units[0].kind == EMBEDDING and units[-1].kind == HEAD
    modules = {m for u in units for m in u.modules}
    for pname, _ in model.named_parameters(remove_duplicate=False):
        assert len(owner(pname, modules)) == 1, (pname, owner(pname, modules))
    # FSDP units are disjoint, and what they leave is the root's: embedding, head, re-injection
    shard = [u.name for u in model.shard_units()]
    for pname, _ in model.named_parameters(remove_duplicate=False):
        assert len(owner(pname, set(shard))) <= 1
    # blocks: every transformer block once, global indices 0..n-1 in forward order
    refs = model.blocks()
    assert [r.index for r in refs] == list(range(costs.count_params(model.cfg)["n_blocks"]))
    assert {id(r.module) for r in refs} == {id(m) for m in model.modules() if isinstance(m, Block)}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_forward_units_in_runs_equals_the_model(name):
    model = built(name)
    tokens = torch.randint(0, 61, (2, 12))
    labels = torch.randint(0, 61, (2, 12))
    pos = torch.arange(12).expand(2, 12)
    docs = (torch.arange(12) >= 5).long().expand(2, 12)
    units = model.units()
    whole = model.forward_units(units, tokens, labels=labels)
    torch.testing.assert_close(whole, model(tokens, labels=labels), rtol=0, atol=0)
    # cut anywhere: each run takes what the run before it returned
    for cut in range(1, len(units)):
        x = model.forward_units(units[:cut], tokens, pos, docs)
        out = model.forward_units(units[cut:], x, pos, docs)
        torch.testing.assert_close(out, model(tokens, pos, docs), rtol=0, atol=0)


def test_truncated_backprop_is_a_property_of_the_units():
    model = built("looped_truncated")
    graph = [u.builds_graph for u in model.units() if not u.is_layer or u.name.startswith("core@")]
    assert graph == [True, False, False, True, True, True]  # embedding, 4 iterations (last 2 graph), head


def test_pruned_model_keeps_its_names_and_global_block_indices():
    model = built("looped_concat_lora")
    units = model.units()
    stage = build_model(model.cfg)
    stage.prune_to(units[-2:])  # coda.0, head
    assert [(r.index, r.name) for r in stage.blocks()] == [(3, "coda.0")]  # prelude 1 + core 2 before it
    assert stage.loop_body() is None and stage.lora_points() == [] and stage.loss_head() is not None
    assert {n.split(".")[0] for n, _ in stage.named_parameters()} == {"coda", "head"}
    with pytest.raises(ValueError, match="contiguous"):
        build_model(model.cfg).prune_to([units[0], units[2]])


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_costs_from_the_config_equal_the_built_model(name):
    model = built(name)
    m = model.cfg
    counts = costs.count_params(m)
    assert counts == model.param_counts()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["block"] == sum(p.numel() for p in model.blocks()[0].module.parameters())
    lora = sum(p.numel() for point in model.lora_points() for p in point.module.parameters())
    assert costs.lora_params(m) == lora
    # weights multiplied per token: every linear a unit runs, counted per run (the core per iteration)
    linears = 0
    for u in model.units():
        for mod in u.modules:
            linears += sum(lin.weight.numel() for lin in model.get_submodule(mod).modules()
                           if isinstance(lin, nn.Linear))
    lora_per_iteration = sum(point.module.A[0].numel() + point.module.B[0].numel() for point in model.lora_points())
    assert costs.matmul_params_per_token(m) == linears + lora_per_iteration * m.loops * (m.arch == "looped")
    # the pipeline's unit costs add up to the forward FLOPs the metrics report (plus the loss pass)
    total = sum(unit_cost(m, u, 24) for u in model.units())
    assert total == pytest.approx(costs.flops_per_token(m, 24, causal=True) / 3 + costs.loss_flops_per_token(m))


class Trunk(DescribedModel):
    """A decoder whose blocks live under another name than the longtrain models use."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.trunk = nn.ModuleList(Block(cfg) for _ in range(3))
        self.out = LMHead(cfg.dim, cfg.vocab_size, cfg.norm_eps)

    @classmethod
    def units_for(cls, cfg, n_loops=None):
        return ([Unit("embed", EMBEDDING, ("embed",))] + [Unit(f"trunk.{i}", BLOCK, (f"trunk.{i}",), i) for i in range(3)]
                + [Unit("out", HEAD, ("out",))])

    def blocks(self):
        return [BlockRef(i, f"trunk.{i}", b) for i, b in enumerate(self.trunk)]

    def shard_units(self):
        return [ShardUnit(r.name, r.module) for r in self.blocks()]


class Forgetful(Trunk):
    def shard_units(self):
        return super().shard_units()[:2]


def test_fsdp_units_come_from_the_model_whatever_its_containers_are_called():
    cfg = model_cfg("llama")
    model = Trunk(cfg)
    assert [u.module for u in fsdp_units(model)] == list(model.trunk)  # one unit per block
    with pytest.raises(ValueError, match=r"trunk\.2"):
        fsdp_units(Forgetful(cfg))  # a block left to the root is named
    plain = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="does not describe its units"):
        fsdp_units(plain)  # not silently one unit for everything


def test_recompute_on_a_pipeline_stage_selects_blocks_by_their_global_index():
    from longtrain.memory.recompute import apply_recompute

    model = built("looped_concat_lora")
    stage = build_model(model.cfg)
    stage.prune_to(model.units()[-2:])  # coda.0 (global block 3) and the head: no core here
    mem = load_config(None, ["memory.recompute_loops=true", "memory.recompute_layers=['3:full']"]).memory
    assert apply_recompute(stage, mem) == {"coda.0": "full"}
