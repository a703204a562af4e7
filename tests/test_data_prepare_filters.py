"""``longtrain data prepare`` on a real source tree: empty documents are skipped and counted by
default (an empty ``__init__.py`` used to stop the job), and ``--min-length`` keeps long documents."""

import json

import pytest

from longtrain.data.cli import main as data_main
from longtrain.data.prepare import prepare
from longtrain.data.shards import ShardDocuments
from longtrain.data.validate import DataError


def _package(tmp_path):
    pkg = tmp_path / "src" / "pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")  # what every Python package has
    (pkg / "blank.py").write_text("\n  \n")
    (pkg / "short.py").write_text("x = 1\n")
    (pkg / "long.py").write_text("def f(x):\n    return x * 2\n" * 20)
    return pkg.parent


def test_prepare_skips_and_counts_empty_files_of_a_real_directory_by_default(tmp_path, capsys):
    src = _package(tmp_path)
    assert data_main(["data", "prepare", str(src), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    line = capsys.readouterr().out
    assert "2 documents" in line and "skipped documents: 2 empty" in line
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["complete"] and m["num_docs"] == 2 and m["skipped"] == {"empty": 2}


def test_prepare_on_empty_document_error_names_the_file(tmp_path):
    src = _package(tmp_path)
    with pytest.raises(DataError, match=r"__init__\.py.*empty document"):
        prepare([str(src)], tmp_path / "out", progress=False, on_empty_document="error")


def test_min_length_keeps_only_long_documents_and_is_recorded_in_the_manifest(tmp_path, capsys):
    src = _package(tmp_path)
    out = tmp_path / "long"
    assert data_main(["data", "prepare", str(src), "--out", str(out), "--min-length", "100", "--no-progress"]) == 0
    assert "1 short" in capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    assert m["job"]["min_length"] == 100 and m["num_docs"] == 1 and m["skipped"] == {"empty": 2, "short": 1}
    docs = ShardDocuments(str(out), vocab_size=259)
    assert len(docs) == 1 and docs.lengths.min() >= 100
    # the same command resumes (a finished job: nothing rewritten); another minimum is another job
    assert data_main(["data", "prepare", str(src), "--out", str(out), "--min-length", "100", "--no-progress"]) == 0
    with pytest.raises(DataError, match="min_length"):
        prepare([str(src)], out, progress=False, min_length=10)
