"""Every bad input gets an error naming the file, the row, the problem and the fix -- or a counted skip."""

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from longtrain.config import DataConfig
from longtrain.data.loader import _DOCS_CACHE, build_loader
from longtrain.data.prepare import prepare
from longtrain.data.tokenizer import ByteTokenizer, describe
from longtrain.data.validate import DataError, sha256_file


@pytest.fixture(autouse=True)
def _fresh_reader_cache():
    _DOCS_CACHE.clear()
    yield
    _DOCS_CACHE.clear()


def _shard_dir(tmp: Path, docs, vocab_size=259) -> Path:
    """A shard folder written by hand (to plant problems prepare would never write)."""
    out = tmp / "hand"
    out.mkdir()
    path = out / "shard-00000.parquet"
    lens = [len(d) for d in docs]
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    values = np.concatenate([np.asarray(d, np.int32) for d in docs]) if docs else np.zeros(0, np.int32)
    table = pa.table({"tokens": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
                      "length": pa.array(np.asarray(lens, np.int32)),
                      "source": pa.array([f"d{i}" for i in range(len(docs))], pa.string())})
    pq.write_table(table, path, row_group_size=2)
    tok = dict(describe(ByteTokenizer()), vocab_size=vocab_size)
    manifest = {"format": "longtrain-token-shards", "version": 1, "tokenizer": tok, "complete": True,
                "shards": [{"index": 0, "file": path.name, "docs": len(docs), "tokens": int(sum(lens)),
                            "bytes": path.stat().st_size, "sha256": sha256_file(path)}]}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def _cfg(path, **kw):
    return DataConfig(source="shards", path=str(path), seq_len=16, batch_size=2, eval_fraction=0.0, **kw)


def _docs(n=8, length=20):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=length) for _ in range(n)]


@pytest.fixture
def prepared(tmp_path):
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": f"document {i} " * 30}) + "\n" for i in range(20)))
    prepare([str(tmp_path / "in.jsonl")], tmp_path / "out", shard_mb=0.001, progress=False)
    return tmp_path / "out"


def test_empty_document_in_the_input_is_named_with_its_line(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"text": "fine"}\n{"text": ""}\n')
    with pytest.raises(DataError, match=r"in.jsonl:2: empty document.*--on-bad-document skip"):
        prepare([str(tmp_path / "in.jsonl")], tmp_path / "out", progress=False, on_empty_document="error")
    m = prepare([str(tmp_path / "in.jsonl")], tmp_path / "out2", on_bad_document="skip", progress=False)
    assert m["num_docs"] == 1 and m["skipped"] == {"empty": 1}


def test_empty_document_in_a_shard_is_named_with_its_row_or_counted(tmp_path):
    d = _shard_dir(tmp_path, _docs(3) + [[]] + _docs(3))
    with pytest.raises(DataError, match=r"shard-00000.parquet row 3: empty document.*on_bad_document=skip"):
        build_loader(_cfg(d), vocab_size=264)
    loader = build_loader(_cfg(d, on_bad_document="skip"), vocab_size=264)
    next(loader)
    assert loader.skipped == {"empty": 1}


def test_token_ids_outside_the_vocabulary_are_refused_or_masked(tmp_path):
    docs = _docs(6)
    docs[4] = np.full(20, 280)  # a manifest that lies: vocab 259 recorded, id 280 stored
    d = _shard_dir(tmp_path, docs)
    loader = build_loader(_cfg(d), vocab_size=264)
    with pytest.raises(DataError, match=r"row 4: token id 280 is outside the vocabulary \[0, 264\).*model.vocab_size"):
        for _ in range(10):
            next(loader)
    _DOCS_CACHE.clear()
    loader = build_loader(_cfg(d, on_bad_document="skip"), vocab_size=264)
    for _ in range(10):
        b = next(loader)
        assert int(b["tokens"].max()) < 264  # the bad document's slots are padding with -100 labels
    assert loader.skipped == {"vocab": 1}


def test_a_tokenizer_vocab_larger_than_the_model_names_both_settings(prepared):
    with pytest.raises(DataError, match=r"data.tokenizer='byte' has 259 tokens but model.vocab_size=128.*Raise"):
        build_loader(_cfg(prepared), vocab_size=128)


def test_missing_text_field_and_column_name_the_file_and_the_flag(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match=r"a.jsonl:1: no text field 'text' \(fields: \['body'\]\); pass --text-field"):
        prepare([str(tmp_path / "a.jsonl")], tmp_path / "o1", progress=False)
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"a.parquet: no text column 'text' \(columns: \['body'\]\); pass --text-column"):
        prepare([str(tmp_path / "a.parquet")], tmp_path / "o2", progress=False)


def test_a_corrupt_shard_fails_its_checksum(prepared):
    shard = sorted(prepared.glob("shard-*.parquet"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"shard .*{shard.name} is corrupt: sha256 .*re-run `longtrain data prepare`"):
        build_loader(_cfg(prepared), vocab_size=264)


def test_a_truncated_shard_is_caught_by_size_and_by_the_parquet_reader(prepared):
    shard = sorted(prepared.glob("shard-*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[:-40])
    with pytest.raises(DataError, match=rf"{shard.name} has \d+ bytes but the manifest records \d+.*truncated"):
        build_loader(_cfg(prepared), vocab_size=264)
    m = json.loads((prepared / "manifest.json").read_text())
    m["shards"][0]["bytes"] = shard.stat().st_size  # a manifest edited to match: the reader still notices
    (prepared / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=rf"{shard.name} is not a readable Parquet file.*corrupt or truncated"):
        build_loader(_cfg(prepared, verify_checksums=False), vocab_size=264)


def test_a_tokenizer_that_does_not_match_the_manifest_is_refused(prepared, tmp_path):
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match=r"does not match the tokenizer the shards .* were prepared with .*spec 'byte'"
                                        r".*Set data.tokenizer='byte'"):
        build_loader(_cfg(prepared, tokenizer=str(tmp_path / "tokenizer.json")), vocab_size=264)


def test_a_missing_shard_is_named(prepared):
    shard = sorted(prepared.glob("shard-*.parquet"))[2]
    os.remove(shard)
    with pytest.raises(DataError, match=rf"{shard.name} is listed in .*manifest.json but missing"):
        build_loader(_cfg(prepared), vocab_size=264)


def test_an_empty_dataset_is_refused(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"text": ""}\n{"text": "  "}\n')
    prepare([str(tmp_path / "in.jsonl")], tmp_path / "out", on_bad_document="skip", progress=False)
    with pytest.raises(DataError, match="holds no usable documents"):
        build_loader(_cfg(tmp_path / "out"), vocab_size=264)
    with pytest.raises(DataError, match=r"holds no manifest.json; point it at a folder written by `longtrain data prepare`"):
        build_loader(_cfg(tmp_path / "nowhere"), vocab_size=264)


def test_a_damaged_manifest_is_named(prepared):
    (prepared / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=r"manifest.json is not valid JSON.*Delete it and re-run"):
        build_loader(_cfg(prepared), vocab_size=264)
