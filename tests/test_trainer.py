"""The single-process trainer: determinism, what a run writes, and that it learns."""

import json

import pytest
import torch

from longtrain.config import load_config
from longtrain.trainer.train import train

TINY = ["model.dim=64", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128", "data.seq_len=64",
        "data.batch_size=4", "logging.progress=false", "logging.log_every=1", "checkpoint.save_final=false"]


def run(tmp_path, name, *extra):
    cfg = load_config("tiny", [*TINY, f"logging.run_dir={tmp_path}/{name}", *extra])
    result = train(cfg)
    losses = [json.loads(l)["loss"] for l in open(tmp_path / name / "metrics.jsonl") if '"loss"' in l]
    return result, losses


def test_same_seed_gives_the_same_loss_trajectory_and_another_seed_does_not(tmp_path):
    _, a = run(tmp_path, "a", "schedule.steps=6", "schedule.warmup_steps=2", "schedule.eval_every=0")
    _, b = run(tmp_path, "b", "schedule.steps=6", "schedule.warmup_steps=2", "schedule.eval_every=0")
    _, c = run(tmp_path, "c", "schedule.steps=6", "schedule.warmup_steps=2", "schedule.eval_every=0", "schedule.seed=7")
    assert len(a) == 6 and a == b
    assert a != c


def test_run_writes_config_metrics_and_tensorboard_and_the_loss_falls(tmp_path):
    pytest.importorskip("tensorboard")
    result, losses = run(tmp_path, "r", "schedule.steps=40", "schedule.eval_every=20", "schedule.eval_batches=2",
                         "optim.lr=3e-3", "model.loops_max=6", "model.loop_sampling=uniform")
    d = tmp_path / "r"
    assert load_config(d / "config.yaml").schedule.steps == 40  # the resolved config, reloadable
    recs = [json.loads(l) for l in open(d / "metrics.jsonl")]
    assert any("eval_loss" in r for r in recs)
    assert {"tokens_per_s", "mfu", "mfu_causal", "grad_norm", "lr"} <= set(recs[0])
    assert list((d / "tb").glob("events.out.tfevents.*"))
    assert losses[-1] < 0.75 * losses[0]  # byte-level Python source: 5.6 -> well under 4 in 40 steps
    assert result["step"] == 40


def _one_second_steps(monkeypatch):
    """The loop's clock advances by exactly one second per training step (forward_backward), so a
    window's step time is known whatever the machine's load."""
    import types

    import longtrain.trainer.train as train_mod

    clock = [0.0]
    real_fb = train_mod.forward_backward

    def forward_backward(*args, **kwargs):
        clock[0] += 1.0
        return real_fb(*args, **kwargs)

    monkeypatch.setattr(train_mod, "forward_backward", forward_backward)
    monkeypatch.setattr(train_mod, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))


def test_throughput_of_a_short_window_divides_by_the_steps_in_it(tmp_path, monkeypatch):
    """log_every=4 over 6 steps, then resumed to 10: the windows ending at steps 6 (the last of the
    run) and 8 (the first after resuming at step 6) hold 2 steps, and their step time and tokens/s
    are those of 2 steps, not of 4."""
    _one_second_steps(monkeypatch)
    common = [f"logging.run_dir={tmp_path}/r", "logging.log_every=4", "schedule.eval_every=0",
              "schedule.warmup_steps=2"]
    train(load_config("tiny", [*TINY, *common, "schedule.steps=6", "checkpoint.save_final=true"]))
    train(load_config("tiny", [*TINY, *common, "schedule.steps=10"]))
    recs = [json.loads(l) for l in open(tmp_path / "r" / "metrics.jsonl") if '"loss"' in l]
    tokens_per_step = 4 * 64
    assert [r["step"] for r in recs] == [4, 6, 8, 10]
    for r in recs:
        assert r["step_time_s"] == pytest.approx(1.0), r
        assert r["tokens_per_s"] == pytest.approx(tokens_per_step / 1.0), r
    assert [r["window_steps"] for r in recs] == [4, 2, 2, 2]


def test_measuring_the_cpu_peak_leaves_the_global_rng_alone():
    """device_peak_flops runs after a resume restored the RNG state: it must not draw from it."""
    from longtrain.trainer import metrics

    metrics._cpu_peak_cache.clear()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    metrics.device_peak_flops(torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), before)
    metrics._cpu_peak_cache.clear()
    torch.manual_seed(123)
    torch.randn(4)  # the check can fail: drawing moves the state
    assert not torch.equal(torch.get_rng_state(), before)
