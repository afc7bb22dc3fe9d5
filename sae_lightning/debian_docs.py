"""Build the offline documentation corpus: English technical prose from Debian's doc packages.

``python -m sae_lightning.debian_docs [--out outputs/corpus/debian_docs]`` downloads the
packages of ``SOURCES`` at their pinned versions (``apt-get download``, from the Debian archive
the machine's apt already uses: the only download, done once, never at run time), unpacks
them with ``dpkg -x``, takes the English documents each ships (reStructuredText / Markdown /
POD / AsciiDoc sources where the package has them, otherwise its HTML with the markup
stripped), removes every paragraph already seen earlier in the corpus (exact match after
collapsing whitespace: licence blocks, navigation, pages a package ships twice), shuffles
the documents with a fixed seed (so that a cache's training, validation and test tokens are
drawn from every package alike) and writes them as JSON lines under ``<out>/text/``, with
``<out>/manifest.json`` recording each package's name, version and .deb sha256, each output
file's sha256 and the corpus' size in words and MiniLM tokens. The same packages give the
same files byte for byte. Read it like any local corpus: ``data.harvest.corpus.path=<out>/text``
(``configs/data/minilm_docs.yaml``, ``smollm2_docs.yaml``; docs/data.md).

Why our own code: no library turns Debian packages into a text corpus; the HTML is read with
the standard library's ``html.parser``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from .atomic import atomic_write_json
from .data.shards import sha256_file
from .errors import DataError

SEED = 0  # the documents' shuffle
PART_DOCUMENTS = 2000  # documents per output file
MIN_WORDS = 40  # a document left shorter than this after deduplication is dropped


@dataclass(frozen=True)
class Source:
    """One Debian package and the files of it that are English prose (globs relative to the
    unpacked tree; ``exclude`` are fnmatch-style globs on the same relative path)."""

    package: str
    version: str
    include: tuple[str, ...]
    exclude: tuple[str, ...] = ()


_SPHINX = ("**/_sources/**/*.txt",)
SOURCES: tuple[Source, ...] = (
    Source("python3.11-doc", "3.11.2-6+deb12u8", ("usr/share/doc/python3.11/html/_sources/**/*.txt",)),
    Source("linux-doc-6.1", "6.1.176-1", ("usr/share/doc/linux-doc-6.1/Documentation/**/*.rst.gz",)),
    Source("perl-doc", "5.36.0-7+deb12u3", ("usr/share/perl/5.36.0/pod/*.pod",)),
    Source("postgresql-doc-15", "15.18-0+deb12u1", ("usr/share/doc/postgresql-doc-15/html/*.html",)),
    Source("git-doc", "1:2.39.5-0+deb12u3", ("usr/share/doc/git-doc/**/*.txt",)),
    Source(
        "python-django-doc",
        "3:3.2.25-0+deb12u3",
        ("usr/share/doc/python-django-doc/html/**/*.html",),
        ("*/_modules/*", "*/genindex*.html", "*/py-modindex.html", "*/search.html"),
    ),
    Source("python-sqlalchemy-doc", "1.4.46+ds1-1", ("usr/share/doc/python-sqlalchemy-doc/rst/**/*.rst",)),
    Source("cmake-doc", "3.25.1-1", _SPHINX),
    Source("sphinx-doc", "5.3.0-4", _SPHINX),
    Source("developers-reference", "12.18", _SPHINX),
    Source("debian-policy", "4.6.2.0", _SPHINX),
    Source("debian-handbook", "11.20220922", ("usr/share/doc/debian-handbook/html/en-US/*.html",)),
    Source("debian-reference-en", "2.100", ("**/*.html",)),
    Source("nodejs-doc", "18.20.4+dfsg-1~deb12u2", ("usr/share/doc/nodejs/api/*.md.gz",)),
    Source("gimp-help-en", "2.10.34-2", ("usr/share/gimp/2.0/help/en/*.html",)),
    Source("libreoffice-help-en-us", "4:7.4.7-1+deb12u14", ("usr/share/libreoffice/help/en-US/text/**/*.html",)),
    Source("octave-doc", "7.3.0-2", ("usr/share/doc/octave/octave.html/*.html",), ("*/index.html",)),
    Source(
        "lilypond-doc-html",
        "2.24.1-2",
        ("usr/share/doc/lilypond/html/Documentation/{learning,notation,usage,extending,music-glossary,essay}/*.html",),
        ("*.*.html",),  # translations: name.de.html and the like
    ),
    Source(
        "rust-doc",
        "1.63.0+dfsg1-2",
        (
            "usr/share/doc/rust-doc/html/{book,reference,nomicon,rust-by-example,edition-guide,embedded-book,"
            "rustc,rustdoc,cargo}/**/*.html",
        ),
        ("*/print.html", "*/toc.html", "*/404.html"),
    ),
    Source(
        "python-scipy-doc",
        "1.10.1-2",
        ("usr/share/doc/python-scipy-doc/html/{tutorial,dev}/**/*.html",),
    ),
    Source(
        "python-pandas-doc",
        "1.5.3+dfsg-2",
        ("usr/share/doc/python-pandas-doc/html/_sources/{user_guide,getting_started,development,whatsnew}/**/*.txt",),
    ),
)

_BLOCK = {
    "p", "div", "br", "li", "ul", "ol", "dl", "dt", "dd", "pre", "table", "tr", "td", "th", "section", "article",
    "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "hr", "figure", "figcaption", "title",
}  # fmt: skip
_SKIP = {"script", "style", "nav", "head", "header", "footer", "noscript", "svg", "button", "form"}


class _Text(HTMLParser):
    """The visible text of an HTML page, a paragraph per block element."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0
        self.pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP:
            self.skip += 1
        elif tag in _BLOCK:
            self.parts.append("\n\n")
        if tag == "pre":
            self.pre += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in _BLOCK:
            self.parts.append("\n\n")
        if tag == "pre":
            self.pre = max(0, self.pre - 1)

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))


def html_text(html: str) -> str:
    parser = _Text()
    parser.feed(html)
    parser.close()
    return "".join(parser.parts)


def read_text(path: Path) -> str:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    return html_text(text) if ".htm" in path.name else text


def _expand(pattern: str) -> list[str]:
    """``{a,b}`` alternatives (pathlib's glob has none)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    return [p for alt in m.group(1).split(",") for p in _expand(pattern[: m.start()] + alt + pattern[m.end() :])]


def files_of(root: Path, source: Source) -> list[Path]:
    """The source's files under its unpacked tree, sorted, each once."""
    from fnmatch import fnmatch

    found = {p for inc in source.include for pat in _expand(inc) for p in root.glob(pat) if p.is_file()}
    return sorted(p for p in found if not any(fnmatch("/" + str(p.relative_to(root)), ex) for ex in source.exclude))


def paragraphs(text: str) -> Iterator[str]:
    for block in re.split(r"\n\s*\n", text):
        block = block.strip("\n").rstrip()
        if block.strip():
            yield block


def _key(paragraph: str) -> bytes:
    return hashlib.blake2b(" ".join(paragraph.split()).encode(), digest_size=16).digest()


class Deduplicator:
    """Keeps a paragraph at its first occurrence in the corpus only."""

    def __init__(self) -> None:
        self.seen: set[bytes] = set()
        self.dropped = 0

    def __call__(self, text: str) -> str:
        kept = []
        for p in paragraphs(text):
            key = _key(p)
            if key in self.seen:
                self.dropped += 1
                continue
            self.seen.add(key)
            kept.append(p)
        return "\n\n".join(kept)


def download(sources: Sequence[Source], debs: Path) -> dict[str, Path]:
    """Each source's .deb at its pinned version, from ``debs`` if there, else ``apt-get download``."""
    out = {}
    for s in sources:
        name = f"{s.package}_{s.version.replace(':', '%3a')}_"
        found = sorted(debs.glob(f"{name}*.deb"))
        if not found:
            done = subprocess.run(
                ["apt-get", "download", f"{s.package}={s.version}"], cwd=debs, capture_output=True, text=True
            )
            found = sorted(debs.glob(f"{name}*.deb"))
            if done.returncode != 0 or not found:
                policy = subprocess.run(["apt-cache", "policy", s.package], capture_output=True, text=True).stdout
                candidate = re.search(r"Candidate:\s*(\S+)", policy)
                raise DataError(
                    f"debian_docs: cannot download {s.package}={s.version} "
                    f"(apt offers {candidate.group(1) if candidate else 'no version'}; "
                    f"{(done.stderr.strip().splitlines() or [''])[-1]}): pin the version apt offers in SOURCES, "
                    "or put the .deb in --debs"
                )
        out[s.package] = found[0]
    return out


def count_tokens(files: Sequence[Path]) -> int | None:
    """MiniLM word pieces in the corpus (no special tokens), or None without its package."""
    try:
        from .data.lm import load_tokenizer, resolve

        tokenizer = load_tokenizer(resolve("builtin:minilm"))
    except Exception:  # the package is optional here: the manifest says None
        return None
    total = 0
    for f in files:
        with f.open(encoding="utf-8") as fh:
            batch: list[str] = []
            for line in fh:
                batch.append(json.loads(line)["text"])
                if len(batch) == 256:
                    total += sum(len(ids) for ids in tokenizer(batch, add_special_tokens=False)["input_ids"])
                    batch = []
            if batch:
                total += sum(len(ids) for ids in tokenizer(batch, add_special_tokens=False)["input_ids"])
    return total


def build(out: Path, debs: Path | None = None, sources: Sequence[Source] | None = None, tokens: bool = True) -> dict:
    """Write the corpus to ``out`` (text/part-*.jsonl and manifest.json) and return the manifest.
    The folder appears whole or not at all (built beside it, then renamed)."""
    out, sources = Path(out), SOURCES if sources is None else sources
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"debian_docs: --out {out} exists and is not empty; remove it first to rebuild")
    with tempfile.TemporaryDirectory(prefix="debian_docs_") as tmp:
        work = Path(tmp)
        deb_dir = debs if debs is not None else work / "debs"
        deb_dir.mkdir(parents=True, exist_ok=True)
        debs_of = download(sources, deb_dir)
        dedup = Deduplicator()
        documents: list[dict[str, str]] = []
        packages: list[dict[str, Any]] = []
        for s in sources:
            root = work / "x" / s.package
            root.mkdir(parents=True)
            subprocess.run(["dpkg", "-x", str(debs_of[s.package]), str(root)], check=True)
            kept = words = 0
            files = files_of(root, s)
            if not files:
                raise DataError(f"debian_docs: {s.package}={s.version} holds no file matching {list(s.include)}")
            for f in files:
                text = dedup(read_text(f))
                n = len(text.split())
                if n < MIN_WORDS:
                    continue
                documents.append({"text": text, "source": f"{s.package}:{f.relative_to(root)}"})
                kept += 1
                words += n
            packages.append(
                {
                    "package": s.package,
                    "version": s.version,
                    "deb_sha256": sha256_file(debs_of[s.package]),
                    "files": len(files),
                    "documents": kept,
                    "words": words,
                }
            )
            shutil.rmtree(root)
            print(f"  {s.package} {s.version}: {kept} documents, {words:,} words", flush=True)
        random.Random(SEED).shuffle(documents)
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = out.parent / f".{out.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            text_dir = staging / "text"
            text_dir.mkdir(parents=True)
            parts = []
            for i in range(0, len(documents), PART_DOCUMENTS):
                part = text_dir / f"part-{i // PART_DOCUMENTS:05d}.jsonl"
                with part.open("w", encoding="utf-8") as fh:
                    for doc in documents[i : i + PART_DOCUMENTS]:
                        fh.write(json.dumps(doc, ensure_ascii=False, sort_keys=True) + "\n")
                parts.append(part)
            manifest = {
                "corpus": "debian_docs",
                "command": "python -m sae_lightning.debian_docs",
                "packages": packages,
                "files": [{"file": f"text/{p.name}", "sha256": sha256_file(p)} for p in parts],
                "documents": len(documents),
                "words": sum(len(d["text"].split()) for d in documents),
                "minilm_tokens": count_tokens(parts) if tokens else None,
                "paragraphs_dropped_as_duplicates": dedup.dropped,
                "shuffle_seed": SEED,
                "min_words": MIN_WORDS,
            }
            atomic_write_json(staging / "manifest.json", manifest)
            if out.exists():
                out.rmdir()  # an empty folder (anything else was refused above)
            staging.replace(out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sae_lightning.debian_docs", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/corpus/debian_docs", help="the corpus folder (text/ and manifest.json)")
    p.add_argument("--debs", default=None, help="a folder of the .deb files already downloaded (else apt-get download)")
    a = p.parse_args(argv)
    try:
        m = build(Path(a.out), Path(a.debs) if a.debs else None)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{a.out}: {m['documents']:,} documents, {m['words']:,} words, {m['minilm_tokens']} MiniLM tokens "
        f"({m['paragraphs_dropped_as_duplicates']:,} duplicate paragraphs dropped); corpus.path={a.out}/text"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
