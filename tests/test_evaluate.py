"""Long-context evaluation (trainer/evaluate.py, `longtrain eval`): the scoring on constructed
inputs, and the command end to end on a tiny trained looped checkpoint."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from longtrain.cli import main
from longtrain.config import load_config
from longtrain.data.tokenizer import ByteTokenizer
from longtrain.models.llama import IGNORE_INDEX
from longtrain.trainer.evaluate import (bucket_of, default_passkey_lengths, key_token_hits, passkey_overhead,
                                        passkey_prompt, position_buckets, token_losses, write_results)

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

TINY = ["model.dim=64", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128", "model.n_core=1",
        "model.loops=2", "model.loops_max=3", "model.lora_rank=0", "data.seq_len=128", "data.batch_size=4",
        "data.stdlib_mb=0.25", "data.eval_fraction=0.1", "schedule.steps=3", "schedule.warmup_steps=1",
        "schedule.eval_every=3", "schedule.eval_batches=1", "logging.progress=false", "logging.log_every=1",
        "eval.batches=2", "eval.passkey_trials=2", "eval.passkey_depths=[0.0,0.5,1.0]"]


def test_position_buckets_cover_every_position_once():
    for seq_len in (1, 2, 7, 128, 100):
        buckets = position_buckets(seq_len)
        assert buckets[0] == (0, 1) and buckets[-1][1] == max(seq_len, 1)
        assert all(a[1] == b[0] for a, b in zip(buckets, buckets[1:]))  # contiguous, no overlap
        pos = torch.arange(seq_len)
        idx = bucket_of(pos, len(buckets))
        for p, i in zip(pos.tolist(), idx.tolist()):
            lo, hi = buckets[i]
            assert lo <= p < hi


def test_passkey_prompt_has_the_length_and_puts_the_key_at_the_depth():
    tok = ByteTokenizer()
    filler = np.frombuffer(b"abcdefgh" * 100, dtype=np.uint8).astype(np.int64)
    shortest = passkey_overhead(tok)
    needle = tok.encode("\nThe pass key is 12345.")
    for depth in (0.0, 0.5, 1.0):
        p = passkey_prompt(tok, filler, 300, depth, "12345")
        assert len(p.tokens) == len(p.labels) == 300
        at = next(i for i in range(300) if np.array_equal(p.tokens[i:i + len(needle)], needle))
        n_fill = 300 - shortest
        assert at == 1 + round(depth * n_fill)  # after BOS and the filler before the key
        key_at = np.flatnonzero(p.labels != IGNORE_INDEX)
        assert tok.decode(p.labels[key_at]) == "12345" and tok.decode(p.tokens[key_at + 1]) == "12345"
        assert key_at[-1] == 298  # the last logits predict the last key digit
    with pytest.raises(Exception, match="at least"):
        passkey_prompt(tok, filler, shortest - 1, 0.5, "12345")
    assert default_passkey_lengths(1024, 2, shortest) == [128, 256, 512, 1024]
    assert default_passkey_lengths(128, 1, shortest) == [128]


def test_key_token_hits_scores_a_perfect_a_one_digit_wrong_and_a_blank_prediction():
    tok = ByteTokenizer()
    filler = np.frombuffer(b"xyz " * 200, dtype=np.uint8).astype(np.int64)
    p = passkey_prompt(tok, filler, 200, 0.3, "90210")
    nxt = np.roll(p.tokens, -1)
    logits = torch.zeros(3, 200, 259)
    logits[:, torch.arange(200), torch.from_numpy(nxt)] = 5.0  # rows 0-2: a teacher-forced perfect model
    key_at = np.flatnonzero(p.labels != IGNORE_INDEX)
    logits[1, key_at[2], ord("7")] = 9.0  # row 1: the third digit comes out wrong
    logits[2] = 0.0  # row 2: argmax 0 everywhere
    labels = torch.from_numpy(p.labels).expand(3, -1)
    hits, n = key_token_hits(logits, labels)
    assert n.tolist() == [5, 5, 5] and hits.tolist() == [5, 4, 0]


def test_missing_matplotlib_says_how_to_install_and_still_writes_the_json(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    result = {"step": 7, "seq_len": 8, "loss_by_position": {"loss": 1.0, "tokens": 2,
                                                            "buckets": [{"lo": 0, "hi": 1, "loss": 1.0, "tokens": 2}]},
              "passkey": {"lengths": [8], "depths": [0.0], "trials": 1, "accuracy": [[0.0]], "digit_accuracy": [[0.0]]}}
    info = write_results(result, tmp_path, plots=True, tensorboard=False)
    assert json.loads((tmp_path / "eval" / "step-7.json").read_text()) == result
    assert any("pip install 'longtrain[plots]'" in n for n in info["notes"])
    assert not list((tmp_path / "eval").glob("*.png"))


def test_eval_of_a_missing_path_is_one_line_naming_it(tmp_path, capsys):
    missing = tmp_path / "runs" / "nope"
    assert main(["eval", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(missing) in err and "run directory" in err and "\n" not in err and "Traceback" not in err
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "empty_run" / "config.yaml").write_text("model: {}\n")
    assert main(["eval", str(tmp_path / "empty_run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no checkpoints" in err and "\n" not in err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny looped run whose training also ran the evaluation at its last step (eval.every_eval)."""
    from longtrain.trainer.train import train

    run = tmp_path_factory.mktemp("eval") / "run"
    train(load_config("tiny", [*TINY, f"logging.run_dir={run}", "eval.every_eval=true"]))
    in_training = json.loads((run / "eval" / "step-3.json").read_text())
    return run, in_training


def test_eval_command_on_a_trained_checkpoint_writes_json_plots_and_tensorboard(trained_run):
    run, in_training = trained_run
    assert main(["eval", str(run)]) == 0
    r = json.loads((run / "eval" / "step-3.json").read_text())
    buckets = r["loss_by_position"]["buckets"]
    assert [(b["lo"], b["hi"]) for b in buckets] == position_buckets(128)
    assert all(b["tokens"] > 0 and 0 < b["loss"] < 10 for b in buckets)
    pk = r["passkey"]
    assert pk["lengths"] == [128] and pk["depths"] == [0.0, 0.5, 1.0]
    assert np.array(pk["accuracy"]).shape == (1, 3) and np.array(pk["digit_accuracy"]).shape == (1, 3)
    assert all(0.0 <= a <= 1.0 for row in pk["accuracy"] + pk["digit_accuracy"] for a in row)
    # looped: 1 .. loops_max (3) and eval.loops_past (2) beyond, the checkpoint having no LoRA tables
    assert [x["loops"] for x in r["loss_vs_loops"]] == [1, 2, 3, 4, 5]
    assert all(np.isfinite(x["loss"]) for x in r["loss_vs_loops"])
    for name in ("loss_by_position", "passkey", "loss_vs_loops"):
        assert (run / "eval" / f"step-3-{name}.png").stat().st_size > 1000
    assert list((run / "tb").glob("events.out.tfevents.*"))
    # the checkpoint evaluated afterwards gives what the training loop's hook measured at that step
    assert r["loss_by_position"] == in_training["loss_by_position"] and r["passkey"] == in_training["passkey"]
    assert [x["loops"] for x in in_training["loss_vs_loops"]] == [1, 2, 3]  # training: up to loops_max
    assert "not during training" in in_training["loops_note"] and "loops_note" not in r
    assert in_training["loss_vs_loops"] == r["loss_vs_loops"][:3]


def test_eval_does_not_inherit_the_training_layout(trained_run, tmp_path):
    """A run trained with sp=2 on two processes evaluates in one (checkpoints reshard)."""
    import shutil

    run = tmp_path / "run_sp2"
    shutil.copytree(trained_run[0], run)
    step = run / "checkpoints" / "step-3" / "config.yaml"
    step.write_text(step.read_text().replace("  sp: 1\n", "  sp: 2\n"))
    assert load_config(step).parallel.sp == 2
    assert main(["eval", str(run), "eval.plots=false", "eval.loops=[1]", "eval.passkey_trials=1"]) == 0
    assert json.loads((run / "eval" / "step-3.json").read_text())["layout"]["sp"] == 1


# two processes (gloo) against one; data parallel halves the per-rank batch so the global batch is the same
LAYOUTS = {"sp": ["parallel.sp=2"], "dp_shard": ["parallel.dp_shard=2", "data.batch_size=2"], "tp": ["parallel.tp=2"]}
ARGS = ["eval.plots=false", "logging.tensorboard=false", "eval.loops=[1,4]"]


@pytest.fixture(scope="module")
def one_process(trained_run):
    run, _ = trained_run
    assert main(["eval", str(run), *ARGS]) == 0
    return json.loads((run / "eval" / "step-3.json").read_text())


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_eval_on_two_processes_matches_one_process(trained_run, one_process, layout):
    run, one = trained_run[0], one_process
    assert main(["eval", "--nproc", "2", str(run), *LAYOUTS[layout], *ARGS]) == 0
    two = json.loads((run / "eval" / "step-3.json").read_text())
    assert two["layout"][layout] == 2
    for a, b in zip(one["loss_by_position"]["buckets"], two["loss_by_position"]["buckets"]):
        assert a["tokens"] == b["tokens"] and a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert np.allclose(two["passkey"]["digit_accuracy"], one["passkey"]["digit_accuracy"])
    assert [x["loops"] for x in two["loss_vs_loops"]] == [x["loops"] for x in one["loss_vs_loops"]] == [1, 4]
    assert [x["loss"] for x in two["loss_vs_loops"]] == pytest.approx([x["loss"] for x in one["loss_vs_loops"]], rel=1e-4)


def test_token_losses_in_chunks_equal_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 37, 11, generator=g)
    labels = torch.randint(0, 11, (2, 37), generator=g)
    labels[0, 5] = IGNORE_INDEX
    ref = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    torch.testing.assert_close(token_losses(logits, labels, chunk=8), ref)
    assert token_losses(logits, labels)[0, 5] == 0


@pytest.mark.parametrize("override, match", [
    ("eval.passkey_depths=[0.5,2]", r"passkey_depths=\[0.5, 2\] must be fractions in \[0, 1\]"),
    ("eval.passkey_lengths=[128,129]", r"entry 129 must be .* divisible by parallel.sp=2"),
    ("eval.passkey_lengths=[262144]", r"exceeds model.max_seq_len=131072"),
    ("eval.loops=[0,2]", r"eval.loops=\[0, 2\] must hold loop counts >= 1"),
])
def test_eval_settings_are_checked_before_anything_is_loaded(override, match):
    from longtrain.config import ConfigError
    from longtrain.trainer.evaluate import check_eval_settings

    with pytest.raises(ConfigError, match=match):
        check_eval_settings(load_config("tiny", [override, "parallel.sp=2"]))
