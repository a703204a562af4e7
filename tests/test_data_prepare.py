"""``data prepare``: text/JSONL/Parquet -> shards round trip, byte and HF tokenizers, resume, workers."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from longtrain.config import DataConfig
from longtrain.data.cli import main as cli_main
from longtrain.data.loader import build_loader
from longtrain.data.prepare import prepare
from longtrain.data.shards import ShardDocuments
from longtrain.data.tokenizer import ByteTokenizer, HFTokenizer, encode_document, load_tokenizer


def _texts(n=40, seed=0):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "long", "context", "token", "shard", "é", "日本"]
    return [" ".join(rng.choice(words, size=int(rng.integers(3, 200)))) for _ in range(n)]


def _tiny_hf_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>", "<pad>"])
    tok.train_from_iterator(_texts(50, seed=9), trainer)
    tok.save(str(path))
    return path


def _write_inputs(tmp: Path, texts):
    (tmp / "txt").mkdir()
    for i, t in enumerate(texts):
        (tmp / "txt" / f"doc{i:03d}.txt").write_text(t)
    with open(tmp / "docs.jsonl", "w") as f:
        for t in texts:
            f.write(json.dumps({"id": 1, "body": t}) + "\n")
    pq.write_table(pa.table({"content": texts}), tmp / "docs.parquet", row_group_size=7)
    return {"text": [str(tmp / "txt")], "jsonl": [str(tmp / "docs.jsonl")], "parquet": [str(tmp / "docs.parquet")]}


def _read_all(out, tok, vocab=None):
    docs = ShardDocuments(str(out), vocab_size=vocab or tok.vocab_size, tokenizer=tok)
    return [docs.get(i).tolist() for i in range(len(docs))]


@pytest.mark.parametrize("kind", ["text", "jsonl", "parquet"])
@pytest.mark.parametrize("tokenizer", ["byte", "hf"])
def test_prepare_round_trip_gives_back_the_tokenized_documents(tmp_path, kind, tokenizer):
    texts = _texts()
    inputs = _write_inputs(tmp_path, texts)
    spec = "byte" if tokenizer == "byte" else str(_tiny_hf_tokenizer(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(spec)
    m = prepare(inputs[kind], tmp_path / "out", tokenizer=spec, text_field="body", text_column="content",
                shard_mb=0.002, row_group_tokens=300, progress=False)
    assert m["complete"] and len(m["shards"]) > 2 and m["num_docs"] == len(texts)
    assert m["tokenizer"]["fingerprint"] == tok.fingerprint()
    assert any(e["row_groups"] > 1 for e in m["shards"])
    want = [encode_document(tok, tok.encode(t)).tolist() for t in texts]
    assert _read_all(tmp_path / "out", tok) == want
    if tokenizer == "hf":
        assert isinstance(tok, HFTokenizer) and tok.bos_id == 1 and tok.eos_id == 2 and tok.pad_id == 3
        assert want[0][0] == 1 and want[0][-1] == 2


def test_the_prepared_shards_train_through_build_loader(tmp_path):
    prepare(["stdlib"], tmp_path / "out", stdlib_mb=0.5, shard_mb=0.2, progress=False)
    cfg = DataConfig(source="shards", path=str(tmp_path / "out"), seq_len=128, batch_size=4)
    b = next(build_loader(cfg, vocab_size=264))
    assert b["tokens"].shape == (4, 128) and int(b["tokens"].max()) < 259


def test_multiprocess_prepare_writes_the_same_shards_as_one_process(tmp_path):
    inputs = _write_inputs(tmp_path, _texts(60))
    one = prepare(inputs["jsonl"], tmp_path / "one", text_field="body", shard_mb=0.002, progress=False)
    two = prepare(inputs["jsonl"], tmp_path / "two", text_field="body", shard_mb=0.002, workers=2, progress=False)
    assert len(one["shards"]) > 3
    assert [e["sha256"] for e in one["shards"]] == [e["sha256"] for e in two["shards"]]


def test_rerunning_an_interrupted_prepare_resumes_and_skips_finished_shards(tmp_path):
    inputs = _write_inputs(tmp_path, _texts(60))
    kw = dict(text_field="body", shard_mb=0.002, progress=False)
    part = prepare(inputs["jsonl"], tmp_path / "out", stop_after=2, **kw)
    assert not part["complete"] and len(part["shards"]) == 2
    first = tmp_path / "out" / part["shards"][0]["file"]
    mtime = first.stat().st_mtime_ns
    with pytest.raises(Exception, match="unfinished"):
        ShardDocuments(str(tmp_path / "out"), vocab_size=259)
    done = prepare(inputs["jsonl"], tmp_path / "out", workers=2, **kw)
    assert done["complete"] and done["_written"] == len(done["shards"]) - 2
    assert first.stat().st_mtime_ns == mtime  # not rewritten
    fresh = prepare(inputs["jsonl"], tmp_path / "fresh", **kw)
    assert [e["sha256"] for e in done["shards"]] == [e["sha256"] for e in fresh["shards"]]
    with pytest.raises(Exception, match="other settings .*shard_mb"):
        prepare(inputs["jsonl"], tmp_path / "out", text_field="body", shard_mb=0.01, progress=False)


def test_cli_prepare_and_inspect(tmp_path, capsys):
    inputs = _write_inputs(tmp_path, _texts(10))
    assert cli_main(["data", "prepare", *inputs["parquet"], "--out", str(tmp_path / "o"), "--text-column",
                     "content", "--workers", "2", "--no-progress"]) == 0
    assert cli_main(["data", "inspect", str(tmp_path / "o"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "10 documents" in out and "verified 1 shards" in out
    assert cli_main(["data", "prepare", *inputs["parquet"], "--out", str(tmp_path / "p"), "--no-progress"]) == 2
    assert "--text-column" in capsys.readouterr().err


def test_byte_tokenizer_ids_and_fingerprints_are_stable(tmp_path):
    t = ByteTokenizer()
    assert t.vocab_size == 259 and (t.bos_id, t.eos_id, t.pad_id) == (256, 257, 258)
    assert t.encode("aé").tolist() == [97, 0xC3, 0xA9] and t.decode(t.encode("aé")) == "aé"
    p = _tiny_hf_tokenizer(tmp_path / "tokenizer.json")
    assert HFTokenizer(p).fingerprint() == HFTokenizer(tmp_path).fingerprint() != t.fingerprint()


def test_prepare_workers_finish_when_the_parent_handles_sigterm(tmp_path):
    """A trainer in the same process installs a SIGTERM handler; forked pool workers used to
    inherit it, ignore ``Pool.terminate`` while waiting on the task queue, and hang the parent.
    The hang is a race (seen once in a CI run), so the deterministic part checks what prevents it:
    a worker of prepare's pool runs with SIGTERM at its default while the parent handles it; then
    ten prepares in a child process with such a handler must all finish."""
    import multiprocessing
    import signal

    from longtrain.data.prepare import _worker_signals

    prev = signal.signal(signal.SIGTERM, lambda *a: None)
    try:
        with multiprocessing.get_context("fork").Pool(1, initializer=_worker_signals) as pool:
            assert pool.apply(signal.getsignal, (signal.SIGTERM,)) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, prev)
    import subprocess
    import sys

    inputs = _write_inputs(tmp_path, _texts(10))
    code = (
        "import signal, sys\n"
        "from longtrain.data.prepare import prepare\n"
        "signal.signal(signal.SIGTERM, lambda *a: None)\n"
        "for i in range(10):\n"
        f"    prepare({inputs['jsonl']!r}, {str(tmp_path)!r} + f'/o{{i}}', workers=2, text_field='body', shard_mb=0.002, progress=False)\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_the_trainer_removes_its_signal_handlers_when_the_run_fails(tmp_path):
    """The trainer removes its SIGTERM/SIGUSR1 handlers also when the run ends in an error."""
    import signal

    from longtrain.config import load_config
    from longtrain.trainer.train import train

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    cfg = load_config("tiny-llama", ["schedule.device=cpu", "schedule.steps=3", "schedule.warmup_steps=1",
                                     "optim.lr=1e9", "optim.on_nonfinite=stop", "optim.grad_clip=0",
                                     "logging.progress=false", f"logging.run_dir={tmp_path}/run",
                                     "checkpoint.save_final=false", "data.seq_len=32"])
    with pytest.raises(Exception, match="non-finite|nan|inf"):
        train(cfg)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == before
