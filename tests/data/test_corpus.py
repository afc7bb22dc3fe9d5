"""Corpora: local text / JSON lines / parquet, the built-in one, and their errors."""

from __future__ import annotations

import json

import pytest

from sae_lightning.data.corpus import CorpusSpec, describe, documents, python_docstrings
from sae_lightning.errors import ConfigError, DataError


def desc(path, tmp_path, **kw):
    return describe(CorpusSpec(path=str(path), **kw), tmp_path / "corpora")


def test_text_files_are_split_at_blank_lines(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("line one\nline two\n\nsecond paragraph\n\n\n")
    d = desc(f, tmp_path)
    assert d["kind"] == "local" and d["format"] == "text" and len(d["files"][0]["sha256"]) == 64
    assert [t.strip() for t in documents(d)] == ["line one\nline two", "second paragraph"]


def test_json_lines_and_parquet_by_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "a.jsonl").write_text(
        "\n".join(json.dumps({"body": f"doc {i}", "id": i}) for i in range(3)) + "\n"
    )
    assert list(documents(desc(tmp_path / "j", tmp_path, column="body"))) == ["doc 0", "doc 1", "doc 2"]
    pq.write_table(pa.table({"text": ["p0", "p1"]}), tmp_path / "t.parquet")
    assert list(documents(desc(tmp_path / "t.parquet", tmp_path))) == ["p0", "p1"]
    with pytest.raises(ConfigError, match="data.harvest.corpus.column='text'.*body"):
        list(documents(desc(tmp_path / "j", tmp_path)))


def test_mixed_suffixes_and_missing_files(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "a.txt").write_text("x\n")
    (tmp_path / "m" / "b.jsonl").write_text('{"text": "y"}\n')
    with pytest.raises(ConfigError, match="data.harvest.corpus.format='auto'"):
        desc(tmp_path / "m", tmp_path)
    with pytest.raises(DataError, match="no such file"):
        desc(tmp_path / "nope.txt", tmp_path)
    assert desc("some-org/some-dataset", tmp_path)["kind"] == "hub"


@pytest.mark.slow
def test_builtin_corpus_is_written_once_and_deterministic(tmp_path):
    a = python_docstrings(tmp_path / "x")
    b = python_docstrings(tmp_path / "y")
    assert a.read_bytes() == b.read_bytes()
    docs = [json.loads(line) for line in a.read_text().splitlines()]
    assert len(docs) > 1000 and all(len(d["text"]) >= 40 or d["source"].startswith("pydoc") for d in docs)
    assert not any("/test/" in d["source"] or d["source"].startswith("test/") for d in docs)
