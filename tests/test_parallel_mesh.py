"""The device mesh: sizes are checked with errors a user can act on, ranks come from one mesh."""

from __future__ import annotations

import pytest
import torch

from dist_utils import run_distributed


def cfg_with(*overrides):
    from longtrain.config import load_config

    base = ["model.arch=llama", "model.vocab_size=64", "model.dim=48", "model.n_heads=6",
            "model.n_kv_heads=2", "model.ffn_dim=96", "model.n_layers=2", "data.seq_len=48",
            "model.max_seq_len=64"]
    return load_config(None, base + list(overrides))


def dims_for(world_size, *overrides):
    from longtrain.parallel import ParallelDims

    return ParallelDims.from_config(cfg_with(*overrides), world_size=world_size)


def test_dp_shard_fills_what_the_other_sizes_leave():
    d = dims_for(8, "parallel.tp=2", "parallel.dp_replicate=2")
    assert (d.dp_replicate, d.dp_shard, d.sp, d.tp, d.pp) == (2, 2, 1, 2, 1)
    assert d.dp_size == 4 and d.size("dp_shard_sp") == 2 and d.size("dp_sp") == 4
    assert d.describe() == "mesh: pp=1 dp_replicate=2 dp_shard=2 sp=1 tp=2 (world 8)"


def test_product_must_equal_world_size():
    from longtrain.config import ConfigError

    with pytest.raises(ConfigError, match=r"parallel.dp_shard=2 = 8, but the world size is 4"):
        dims_for(4, "parallel.tp=2", "parallel.sp=2", "parallel.dp_shard=2")
    with pytest.raises(ConfigError, match=r"world size 6 is not divisible by .*parallel.sp=4.*dp_shard=-1"):
        dims_for(6, "parallel.sp=4", "model.n_heads=8", "model.dim=64")


def test_sp_must_divide_heads_with_the_valid_choices_named():
    from longtrain.config import ConfigError

    with pytest.raises(ConfigError) as e:
        dims_for(4, "parallel.sp=4")
    assert "parallel.sp=4 does not divide model.n_heads=6" in str(e.value)
    assert "use sp in {1, 2, 3, 6}" in str(e.value)
    # with tensor parallel, Ulysses splits the heads that are left on each tp rank
    with pytest.raises(ConfigError, match=r"parallel.sp=2 .* = 3 heads per tensor-parallel rank; .*\{1, 3\}"):
        dims_for(4, "parallel.sp=2", "parallel.tp=2", "model.n_kv_heads=2")


def test_tp_must_divide_kv_heads_and_widths():
    from longtrain.config import ConfigError

    with pytest.raises(ConfigError, match=r"parallel.tp=3 does not divide model.n_kv_heads=2"):
        dims_for(3, "parallel.tp=3")
    with pytest.raises(ConfigError, match=r"parallel.tp=2 does not divide model.ffn_dim=95"):
        dims_for(2, "parallel.tp=2", "model.ffn_dim=95")


def test_seq_len_must_divide_by_sp_times_tp():
    from longtrain.config import ConfigError

    with pytest.raises(ConfigError, match=r"data.seq_len=45 is not divisible by parallel.sp \* parallel.tp = 3 \* 2"):
        dims_for(6, "parallel.sp=3", "parallel.tp=2", "data.seq_len=45", "model.n_heads=6",
                 "model.n_kv_heads=2")


def test_single_process_needs_no_process_group(monkeypatch):
    import torch.distributed as dist

    from longtrain.parallel import all_reduce_sum, init_distributed

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    dims = init_distributed(cfg_with("schedule.device=cpu"))
    assert not dist.is_initialized() and dims.mesh is None
    assert (dims.rank, dims.world_size, dims.dp_rank, dims.dp_size, dims.sp_rank, dims.tp_rank) == (0, 1, 0, 1, 0, 0)
    assert dims.is_main and dims.get_group("dp") is None
    assert all_reduce_sum(torch.tensor(3.0), dims).item() == 3.0


def test_fsdp_wraps_with_peers_or_for_bf16_or_host_parameters_and_the_mesh_needs_no_fsdp_module():
    import ast

    import longtrain.parallel.mesh as mesh
    from longtrain.parallel.fsdp import fsdp_wraps as from_fsdp
    from longtrain.parallel.precision import fsdp_wraps

    assert from_fsdp is fsdp_wraps  # one function, importable where FSDP lives
    assert fsdp_wraps(1, 2, 1, "fp32", False) and fsdp_wraps(2, 1, 1, "fp32", False) and fsdp_wraps(1, 1, 2, "fp32", False)
    assert not fsdp_wraps(1, 1, 1, "fp32", False)  # one process (or tp/pp alone) in fp32: plain model
    assert fsdp_wraps(1, 1, 1, "bf16", False) and fsdp_wraps(1, 1, 1, "fp32", True)  # the one-rank wrapping
    tree = ast.parse(open(mesh.__file__).read())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "longtrain.parallel.precision" in imported and "longtrain.parallel.fsdp" not in imported


def _mesh_worker():
    import torch.distributed as dist

    from longtrain.parallel import all_reduce_sum, init_distributed

    dims = init_distributed(cfg_with("parallel.dp_replicate=2", "parallel.sp=2", "parallel.tp=2", "model.n_heads=8",
                                     "parallel.backend=gloo", "schedule.device=cpu"))
    one = torch.tensor(1.0)
    return {
        "rank": dims.rank, "pg": dist.is_initialized(),
        "coords": (dims.dp_rank, dims.sp_rank, dims.tp_rank, dims.pp_rank),
        "sizes": (dims.dp_size, dims.sp_size, dims.size("dp_sp")),
        "sum_dp_sp": all_reduce_sum(one, dims).item(),
        "sum_tp": all_reduce_sum(one, dims, over="tp").item(),
        "sum_dp": all_reduce_sum(torch.tensor(float(dims.rank)), dims, over="dp").item(),
    }


def test_mesh_ranks_follow_the_dim_order_with_tp_innermost():
    out = run_distributed(_mesh_worker, 8, init_process_group=False)
    for r in out:
        rank = r["rank"]
        # ("pp", "dp_replicate", "dp_shard", "sp", "tp") with sizes (1, 2, 2, 2... here 1, 2, 1, 2, 2)
        assert r["pg"] and r["coords"] == (rank // 4, (rank // 2) % 2, rank % 2, 0), r
        assert r["sizes"] == (2, 2, 4)
        assert r["sum_dp_sp"] == 4 and r["sum_tp"] == 2
        assert r["sum_dp"] == rank + (rank + 4 if rank < 4 else rank - 4)  # its dp peer is 4 ranks away
