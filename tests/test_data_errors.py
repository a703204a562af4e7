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
    with pytest.raises(DataError, match=r"in.jsonl\) hold no documents to train on \(skipped: 2 empty\)"):
        prepare([str(tmp_path / "in.jsonl")], tmp_path / "out", on_bad_document="skip", progress=False)
    with pytest.raises(DataError, match="holds no usable documents"):  # shards without documents
        build_loader(_cfg(_shard_dir(tmp_path, [])), vocab_size=264)
    with pytest.raises(DataError, match=r"holds no manifest.json; point it at a folder written by `longtrain data prepare`"):
        build_loader(_cfg(tmp_path / "nowhere"), vocab_size=264)


def test_a_damaged_manifest_is_named(prepared):
    (prepared / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=r"manifest.json is not valid JSON.*Delete it and re-run"):
        build_loader(_cfg(prepared), vocab_size=264)


# ------------------------------------------------------------------ raw inputs: compressed, not UTF-8, nothing in them


def _jsonl(n: int, tag: str = "doc") -> str:
    return "".join(json.dumps({"text": f"{tag} {i} " * 20}) + "\n" for i in range(n))


def _tokens(out: Path) -> list[list[int]]:
    return [list(t) for f in sorted(out.glob("shard-*.parquet")) for t in pq.read_table(f)["tokens"].to_pylist()]


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz", ".zst"])
def test_compressed_jsonl_and_text_read_as_their_documents(tmp_path, suffix):
    import bz2
    import gzip
    import lzma

    text = "hello world\n" * 30
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.jsonl").write_text(_jsonl(4))
    (tmp_path / "plain" / "b.txt").write_text(text)
    if suffix == ".zst":
        zstandard = pytest.importorskip("zstandard", reason="optional: .zst inputs need the zstandard package")
        compress = zstandard.ZstdCompressor().compress
    else:
        compress = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}[suffix]
    (tmp_path / "packed").mkdir()
    (tmp_path / "packed" / f"a.jsonl{suffix}").write_bytes(compress(_jsonl(4).encode()))
    (tmp_path / "packed" / f"b.txt{suffix}").write_bytes(compress(text.encode()))
    plain = prepare([str(tmp_path / "plain")], tmp_path / "o1", progress=False)
    packed = prepare([str(tmp_path / "packed")], tmp_path / "o2", progress=False)
    assert plain["num_docs"] == packed["num_docs"] == 5  # 4 JSONL lines + 1 text file, not 2 binary blobs
    assert _tokens(tmp_path / "o1") == _tokens(tmp_path / "o2")


def test_zst_without_zstandard_names_the_package(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "zstandard", None)  # as if not installed: import raises ImportError
    (tmp_path / "a.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    with pytest.raises(DataError, match=r"a.jsonl.zst is zstd-compressed, which needs the zstandard package: "
                                        r"pip install zstandard"):
        prepare([str(tmp_path / "a.jsonl.zst")], tmp_path / "out", progress=False)


def test_a_damaged_gzip_names_the_file(tmp_path):
    (tmp_path / "a.jsonl.gz").write_bytes(b"plain text, not gzip")
    with pytest.raises(DataError, match=r"a.jsonl.gz: cannot be decompressed as .gz .*damaged or not compressed"):
        prepare([str(tmp_path / "a.jsonl.gz")], tmp_path / "out", progress=False)


def test_a_non_utf8_byte_names_file_and_line_and_follows_on_bad_document(tmp_path):
    (tmp_path / "in.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n{"text": "also fine"}\n')
    (tmp_path / "t.txt").write_bytes(b"line one\nline two\nbad \xff here\n")
    with pytest.raises(DataError, match=r"in.jsonl:2: byte 0xe9 is not UTF-8.*--on-bad-document skip"):
        prepare([str(tmp_path / "in.jsonl")], tmp_path / "o1", progress=False)
    with pytest.raises(DataError, match=r"t.txt:3: byte 0xff is not UTF-8"):
        prepare([str(tmp_path / "t.txt")], tmp_path / "o2", progress=False)
    m = prepare([str(tmp_path / "in.jsonl"), str(tmp_path / "t.txt")], tmp_path / "o3", on_bad_document="skip",
                progress=False)
    assert m["num_docs"] == 2 and m["skipped"] == {"encoding": 2}


def test_an_input_with_no_documents_is_an_error_with_exit_code_2(tmp_path, capsys):
    from longtrain.cli import main

    (tmp_path / "in.jsonl").write_text('{"text": ""}\n\n')
    rc = main(["data", "prepare", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("longtrain: data error: ") and "hold no documents to train on (skipped: 1 empty)" in err[0]


def test_split_long_drop_with_nothing_left_advises_split_or_a_longer_seq_len(tmp_path):
    d = _shard_dir(tmp_path, _docs(4, length=40))
    loader = build_loader(replace(_cfg(d), split_long="drop"), vocab_size=264)  # seq_len 16 < every document
    with pytest.raises(DataError, match=r"split_long=drop drops every document longer than a sequence.*"
                                        r"Use data.split_long=split \(or truncate\), or a longer data.seq_len"):
        next(loader)
