"""The looped variants of issue 24 in one process: growing depth, hyper-connected streams, gated
delta rule core layers -- their config rules, costs, planner, exact resume and HF refusal.

(Equality across parallel layouts: tests/test_looped_variants_parallel.py; the recurrence itself:
tests/test_linear_attention.py.)
"""

from __future__ import annotations

import pytest
import torch

from longtrain.config import ConfigError, load_config

TINY = ["model.vocab_size=64", "model.dim=32", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=64",
        "model.n_prelude=1", "model.n_core=2", "model.n_coda=1", "model.loops=2", "model.loops_max=4",
        "model.max_seq_len=64", "data.seq_len=32"]
SCHEDULE = "model.loop_schedule=[[0, 1], [2, 2], [5, 3]]"


def test_schedule_gives_the_loop_count_by_step_and_combines_with_sampling():
    from longtrain.models import loops_at, planned_loops, sample_loops

    m = load_config(None, TINY + [SCHEDULE]).model
    assert [loops_at(m, s) for s in range(7)] == [1, 1, 2, 2, 2, 3, 3]
    assert [sample_loops(m, s, 0, training=True) for s in range(7)] == [1, 1, 2, 2, 2, 3, 3]
    assert sample_loops(m, 0, 0, training=False) == m.loops  # evaluation keeps model.loops
    assert planned_loops(m) == 3
    p = load_config(None, TINY + [SCHEDULE, "model.loop_sampling=poisson"]).model
    early = [sample_loops(p, s, 0, True) for s in range(2)]
    late = [sample_loops(p, 10_000 + s, 0, True) for s in range(200)]
    assert all(1 <= n <= p.loops_max for n in early + late)
    assert abs(sum(late) / len(late) - 3) < 0.5  # drawn around the scheduled count, not model.loops
    assert planned_loops(p) == p.loops_max


@pytest.mark.parametrize("over, match", [
    ([SCHEDULE, "model.loop_sampling=uniform"], "use loop_sampling=fixed"),
    (["model.loop_schedule=[[1, 2]]"], "steps rising from 0"),
    (["model.loop_schedule=[[0, 2], [0, 3]]"], "steps rising from 0"),
    (["model.loop_schedule=[[0, 9]]"], "loops in \\[1, model.loops_max=4\\]"),
    ([SCHEDULE, "parallel.pp=2"], "pipeline stages are cut"),
    (["model.core_attention=[full, gdn, gdn]"], "for each of the model.n_core=2 core layers"),
    (["model.core_attention=[full, mamba]"], "must list 'full' or 'gdn'"),
    (["model.hyper_streams=0"], "must be >= 1"),
    (["model.arch=llama", "model.hyper_streams=2"], "set model.arch=looped"),
])
def test_config_refuses_bad_variant_settings_in_one_line(over, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config(None, TINY + over)
    assert "\n" not in str(e.value)


def test_hyper_streams_at_init_compute_the_plain_model_and_costs_count_exactly():
    from longtrain.models import build_model
    from longtrain.models.costs import count_params

    plain_cfg = load_config(None, TINY + ["model.lora_rank=2"]).model
    torch.manual_seed(0)
    plain = build_model(plain_cfg)
    for over in (["model.hyper_streams=3"], ["model.hyper_streams=2", "model.core_attention=[gdn, full]"]):
        cfg = load_config(None, TINY + ["model.lora_rank=2"] + over).model
        torch.manual_seed(0)
        model = build_model(cfg)
        assert sum(p.numel() for p in model.parameters()) == count_params(cfg)["total"]
    hyper = build_model(load_config(None, TINY + ["model.lora_rank=2", "model.hyper_streams=3"]).model)
    hyper.load_state_dict(plain.state_dict() | {k: v for k, v in hyper.state_dict().items() if k.startswith("hyper.")})
    tokens = torch.randint(0, 64, (2, 32))
    torch.testing.assert_close(hyper(tokens), plain(tokens), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # and the streams do matter once they differ
        hyper.hyper.mix.add_(0.3 * torch.randn_like(hyper.hyper.mix))
    assert (hyper(tokens) - plain(tokens)).abs().max() > 1e-3


def test_gdn_cost_is_linear_in_length_and_the_planner_plans_the_largest_scheduled_count():
    from longtrain.memory.planner import layout_from
    from longtrain.memory.step_memory import estimate, policy_of
    from longtrain.models.costs import flops_per_token

    full = load_config("looped-1b").model
    lt2 = load_config("looped-lt2-1b").model
    f = {L: (flops_per_token(full, L, True), flops_per_token(lt2, L, True)) for L in (2**16, 2**20)}
    # only softmax attention grows with the length: 2 + 2 end blocks and 1 core layer x 4 loops
    # against 2 + 2 and 4 x 4, so the growth is 8/20 of the all-attention model's
    growth = (f[2**20][1] - f[2**16][1]) / (f[2**20][0] - f[2**16][0])
    assert abs(growth - 8 / 20) < 1e-9
    assert f[2**20][1] < 0.45 * f[2**20][0]

    def peak(over):
        cfg = load_config("looped-lt2-1b", ["data.seq_len=65536", "memory.policy=manual"] + over)
        return estimate(cfg, layout_from(cfg, 1), policy_of(cfg.memory)).gpu_total

    assert peak(["model.loop_schedule=[[0, 1], [100, 6]]"]) == peak(["model.loops=6"])
    assert peak(["model.loop_schedule=[[0, 1], [100, 6]]"]) > peak(["model.loops=4"])


def test_hf_export_is_refused_in_one_line_naming_the_variant():
    from longtrain.trainer.hf import HFError, model_config_to_hf

    m = load_config(None, TINY + ["model.core_attention=[full, gdn]", "model.hyper_streams=2"]).model
    with pytest.raises(HFError, match="hyper_streams=2.*no looped Llama") as e:
        model_config_to_hf(m)
    assert "\n" not in str(e.value)


def test_resume_mid_schedule_equals_uninterrupted_with_gdn_and_hyper_streams(tmp_path):
    """Crash after step 5 (checkpoint at step 3), resume: the schedule's 1 -> 2 -> 3 loops continue
    from the checkpoint's step and the losses of steps 4..8 are bitwise those of a straight run."""
    from test_ckpt_resume import check

    check(tmp_path, 1, ("model.arch=looped", "model.n_prelude=1", "model.n_core=2", "model.n_coda=1",
                        "model.loops=2", "model.loops_max=4", SCHEDULE, "model.core_attention=[gdn, full]",
                        "model.hyper_streams=2", "model.lora_rank=2"))


def test_eval_of_a_hyper_streams_checkpoint_stops_at_loops_max(tmp_path):
    """Hyper-connection tables are indexed by iteration like LoRA's: ``longtrain eval`` keeps the
    checkpoint's loops_max instead of building a wider model its weights cannot load into."""
    import json

    from longtrain.cli import main
    from longtrain.trainer.train import train

    run = tmp_path / "run"
    train(load_config("tiny", TINY + ["model.vocab_size=264", "model.max_seq_len=128", "model.hyper_streams=2", "model.core_attention=[gdn, full]",
                                      "data.seq_len=128",
                                      "data.batch_size=2", "data.stdlib_mb=0.25", "data.eval_fraction=0.1",
                                      "schedule.steps=1", "schedule.warmup_steps=0", "schedule.eval_every=0",
                                      "logging.progress=false", "logging.tensorboard=false", f"logging.run_dir={run}"]))
    assert main(["eval", str(run), "eval.batches=1", "eval.passkey_trials=1", "eval.passkey_depths=[0.5]",
                 "eval.plots=false", "eval.loops=[1, 4, 6]"]) == 0
    r = json.loads((run / "eval" / "step-1.json").read_text())
    assert [x["loops"] for x in r["loss_vs_loops"]] == [1, 4]
    assert "model.hyper_streams > 1" in r["loops_note"]
