"""Megatron .bin/.idx corpora, written with megatron-core's own builder, read back as documents."""

import numpy as np
import pytest

from longtrain.config import DataConfig
from longtrain.data.loader import build_loader
from longtrain.data.validate import DataError

pytest.importorskip("megatron.core.datasets.indexed_dataset", reason="megatron-core is not installed")

from longtrain.data.megatron import MegatronDocuments, write_megatron  # noqa: E402


def _docs():
    rng = np.random.default_rng(3)
    return [rng.integers(0, 250, size=int(n)).astype(np.int32) for n in rng.integers(2, 120, size=50)]


def test_megatron_round_trip_through_megatron_core(tmp_path):
    docs = _docs()
    prefix = str(tmp_path / "corpus_text_document")
    write_megatron(prefix, docs)
    md = MegatronDocuments(prefix, vocab_size=256)
    assert len(md) == len(docs) and md.lengths.tolist() == [len(d) for d in docs]
    for i, d in enumerate(docs):
        assert md.get(i).tolist() == d.tolist()
    loader = build_loader(DataConfig(source="megatron", path=prefix + ".bin", seq_len=64, batch_size=2), vocab_size=256)
    b = next(loader)
    assert b["tokens"].shape == (2, 64) and int(b["tokens"].max()) < 250


def test_megatron_errors_name_the_missing_file_and_bad_tokens(tmp_path):
    with pytest.raises(DataError, match=r"nope.idx is missing; data.source=megatron takes the common prefix"):
        (tmp_path / "nope.bin").write_bytes(b"")
        MegatronDocuments(str(tmp_path / "nope"), vocab_size=10)
    prefix = str(tmp_path / "c")
    write_megatron(prefix, _docs())
    md = MegatronDocuments(prefix, vocab_size=100)
    with pytest.raises(DataError, match=r"c.bin document \d+: token id \d+ is outside the vocabulary \[0, 100\)"):
        for i in range(len(md)):
            md.get(i)
