"""The documentation corpus builder on two stand-in .deb packages (built here with dpkg-deb):
what it keeps, what it drops, its manifest, and that it is reproducible byte for byte."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from sae_lightning import debian_docs
from sae_lightning.data.shards import sha256_file
from sae_lightning.errors import DataError

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian)")

WORDS = " ".join(f"word{i}" for i in range(60))
LICENCE = "Permission is granted to copy, distribute and modify this document under the same terms."


def make_deb(tmp, package, version, files):
    root = tmp / f"src_{package}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: {version}\nArchitecture: all\nMaintainer: t <t@t>\nDescription: test\n"
    )
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(gzip.compress(data.encode(), mtime=0) if rel.endswith(".gz") else data.encode())
    debs = tmp / "debs"
    debs.mkdir(exist_ok=True)
    out = debs / f"{package}_{version.replace(':', '%3a')}_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(root), str(out)], check=True, capture_output=True)
    return out


@pytest.fixture
def sources(tmp_path):
    make_deb(
        tmp_path,
        "doc-a",
        "1:1.0-1",
        {
            "usr/share/doc/a/guide.rst": f"Guide\n=====\n\n{WORDS} alpha.\n\n{LICENCE}\n",
            "usr/share/doc/a/api.txt.gz": f"API notes.\n\n{WORDS} beta.\n\n{LICENCE}\n",
            "usr/share/doc/a/short.rst": "Too short to keep.\n",
            "usr/share/doc/a/skip/ignored.rst": f"{WORDS} ignored.\n",
        },
    )
    make_deb(
        tmp_path,
        "doc-b",
        "2.0",
        {
            "usr/share/doc/b/page.html": (
                "<html><head><title>T</title><script>var x = 1;</script></head><body><nav>Home | Next</nav>"
                f"<h1>Page &amp; title</h1><p>{WORDS} gamma.</p><p>{LICENCE}</p><pre>code  kept\n  as is</pre>"
                "</body></html>"
            ),
        },
    )
    return (
        debian_docs.Source("doc-a", "1:1.0-1", ("usr/share/doc/a/**/*.rst", "usr/share/doc/a/*.txt.gz"), ("*/skip/*",)),
        debian_docs.Source("doc-b", "2.0", ("usr/share/doc/b/*.html",)),
    )


def test_the_corpus_keeps_each_paragraph_once_and_records_its_packages(tmp_path, sources):
    m = debian_docs.build(tmp_path / "corpus", tmp_path / "debs", sources, tokens=False)
    docs = [json.loads(line) for f in sorted((tmp_path / "corpus" / "text").glob("*.jsonl")) for line in f.open()]
    by_source = {d["source"]: d["text"] for d in docs}
    assert set(by_source) == {
        "doc-a:usr/share/doc/a/guide.rst",
        "doc-a:usr/share/doc/a/api.txt.gz",
        "doc-b:usr/share/doc/b/page.html",
    }  # the short document and the excluded folder are not there
    text = "\n\n".join(by_source.values())
    assert text.count(LICENCE) == 1  # a paragraph seen before is dropped
    html = by_source["doc-b:usr/share/doc/b/page.html"]
    assert "Page & title" in html and "code  kept\n  as is" in html  # entities decoded, <pre> kept verbatim
    assert "var x" not in html and "Home | Next" not in html and "<p>" not in html
    assert m["documents"] == 3 and m["paragraphs_dropped_as_duplicates"] == 2
    assert [p["package"] for p in m["packages"]] == ["doc-a", "doc-b"]
    assert m["packages"][0]["version"] == "1:1.0-1" and m["packages"][0]["files"] == 3
    assert m["packages"][0]["deb_sha256"] == sha256_file(next((tmp_path / "debs").glob("doc-a_*.deb")))
    for f in m["files"]:
        assert sha256_file(tmp_path / "corpus" / f["file"]) == f["sha256"]
    assert m["words"] == sum(len(d["text"].split()) for d in docs)
    assert json.loads((tmp_path / "corpus" / "manifest.json").read_text()) == m


def test_the_corpus_is_reproducible_and_never_half_written(tmp_path, sources, monkeypatch):
    a = debian_docs.build(tmp_path / "one", tmp_path / "debs", sources, tokens=False)
    b = debian_docs.build(tmp_path / "two", tmp_path / "debs", sources, tokens=False)
    assert a["files"] == b["files"]  # the same bytes
    with pytest.raises(DataError, match="exists and is not empty"):
        debian_docs.build(tmp_path / "one", tmp_path / "debs", sources, tokens=False)

    def boom(*args, **kwargs):
        raise RuntimeError("killed while counting")

    monkeypatch.setattr(debian_docs, "sha256_file", boom)
    with pytest.raises(RuntimeError):
        debian_docs.build(tmp_path / "three", tmp_path / "debs", sources, tokens=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["debs", "one", "src_doc-a", "src_doc-b", "two"]


def test_a_version_apt_cannot_give_is_named(tmp_path, sources, capsys, monkeypatch):
    wrong = (debian_docs.Source("doc-a", "9.9", ("*",)),)
    monkeypatch.setattr(debian_docs, "SOURCES", wrong)
    monkeypatch.setattr(debian_docs.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 100, "", "E: no"))
    assert debian_docs.main(["--out", str(tmp_path / "c"), "--debs", str(tmp_path / "debs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: debian_docs: cannot download doc-a=9.9") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()


def test_the_recorded_build_matches_the_pinned_sources():
    """The manifest of the real build (benchmarks/records/debian_docs/manifest.json, kept so that
    a rebuild can be compared with it file by file) names exactly SOURCES' packages and versions."""
    manifest = json.loads((ROOT / "benchmarks" / "records" / "debian_docs" / "manifest.json").read_text())
    assert [(p["package"], p["version"]) for p in manifest["packages"]] == [
        (s.package, s.version) for s in debian_docs.SOURCES
    ]
    assert manifest["minilm_tokens"] >= 20_000_000  # issue 44: a corpus of at least 20M MiniLM tokens
    assert all(len(f["sha256"]) == 64 for f in manifest["files"])
