"""``longtrain sweep lr``: separate training jobs per width x learning rate, JSON + PNG, and the
small-scale proxy result it exists for (Wortsman et al. 2023): with QK-norm the loss at a high
learning rate stays low where without it training fails.

The proxy task is one attention must solve: synthetic documents that repeat a random 8-token
pattern (``data.synthetic_period=8``, 32-token vocabulary), so after the first period every token
is predictable only by attending 8 places back; without attention the loss is stuck at
ln(32) = 3.47. Width 32, 2 layers, one head (head_dim 32), 300 steps with a 100-step warmup,
z-loss 1e-4 and no weight decay. Measured on CPU (final loss, mean of the last 3 logged) over
schedule.seed 0..4: at lr=0.03 the plain model learns (0.65-1.43, seeds 0-2); at lr=0.1 its
attention logits grow to ~10^3 and its loss stays at or climbs back to ~3.0-3.45, while with
QK-norm (logits ~30) it reaches 1.14-1.86 -- a gap of at least 1.1 nats in every seed. At lr=0.3
neither learns in 300 steps, QK-norm's logits bounded too (so another failure than the one it
prevents); the test's top learning rate is 0.1.
"""

from __future__ import annotations

import json
import math

import pytest

from longtrain.cli import main

PROXY = ["tiny-llama", "model.vocab_size=32", "model.n_layers=2", "model.n_heads=1", "model.n_kv_heads=1",
         "data.source=synthetic", "data.synthetic_period=8", "data.synthetic_doc_len=64", "data.seq_len=64",
         "data.batch_size=8", "optim.z_loss=1e-4", "optim.weight_decay=0", "schedule.steps=300",
         "schedule.warmup_steps=100", "schedule.eval_every=0", "logging.log_every=1", "logging.stability_every=100",
         "logging.tensorboard=false", "schedule.device=cpu"]


def test_sweep_writes_json_and_png_and_qk_norm_keeps_the_loss_low_at_a_learning_rate_where_plain_fails(tmp_path):
    out = tmp_path / "sweep"
    assert main(["sweep", "lr", *PROXY, "--lrs", "0.03,0.1", "--widths", "32", "--jobs", "2", "--out", str(out),
                 "--variant", "plain=", "--variant", "qk=model.qk_norm=true"]) == 0
    record = json.loads((out / "sweep.json").read_text())
    assert record["variants"] == {"plain": [], "qk": ["model.qk_norm=true"]}
    runs = {(r["variant"], r["lr"]): r for r in record["runs"]}
    assert (out / "sweep.png").stat().st_size > 1000
    assert all(r["rc"] == 0 and r["final_loss"] is not None and r["width"] == 32 for r in runs.values())
    assert (out / "qk-w32-lr0.1" / "metrics.jsonl").is_file()
    low, high, high_qk = runs["plain", 0.03], runs["plain", 0.1], runs["qk", 0.1]
    # the plain model learns at lr=0.03 and fails at lr=0.1: near the no-attention loss ln(32)
    assert high["final_loss"] > low["final_loss"] + 1.0, (low, high)
    assert high["final_loss"] > math.log(32) - 1.0, high
    # with QK-norm the same learning rate trains: finite, not diverged, and clearly lower
    assert not high_qk["diverged"] and high_qk["final_loss"] < high["final_loss"] - 0.75, (high, high_qk)
    # the mechanism: attention logits grow without QK-norm and stay bounded with it
    assert high["attn_max_logit"] > 20 * high_qk["attn_max_logit"], (high, high_qk)


@pytest.mark.parametrize("args, message", [
    (["--lrs", "1..1e-3"], "--lrs '1..1e-3' must be LO..HI"),
    (["--widths", "32,x"], "--widths '32,x' must be a comma list"),
    (["--widths", "30"], "sweep width 30, lr 0.001: model.dim=30 is not divisible by model.n_heads=4"),
    (["--variant", "qk"], "--variant 'qk' must be NAME=OVERRIDES"),
    (["--variant", "a=model.qk_norm=maybe"], "sweep variant a: model.qk_norm='maybe' must be a boolean"),
])
def test_bad_sweep_arguments_are_one_line_before_any_job_runs(tmp_path, capsys, args, message):
    rc = main(["sweep", "lr", "tiny-llama", "--lrs", "1e-3,1e-2", "--widths", "32", "--out", str(tmp_path / "s"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "s").exists()
