"""The embedded corpus: data/embedded/*.jsonl.xz listed (with sha256) in data/embedded/MANIFEST.json."""
from __future__ import annotations

import hashlib
import json
import lzma
import os
from typing import Iterator

EMBEDDED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "embedded")
MANIFEST_PATH = os.path.join(EMBEDDED_DIR, "MANIFEST.json")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_manifest(path: str = MANIFEST_PATH) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: restore data/embedded/ from git or run "
                                f"`python -m data.fetch_corpus`")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def embedded_files(verify: bool = True, manifest_path: str = MANIFEST_PATH) -> list[str]:
    """Paths of the embedded corpus files, in MANIFEST order; checks each sha256 when ``verify``."""
    manifest = load_manifest(manifest_path)
    root = os.path.dirname(manifest_path)
    paths = []
    for name, entry in sorted(manifest["files"].items()):
        path = os.path.join(root, name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} (listed in {manifest_path}) is missing: restore it from git or "
                                    f"run `python -m data.fetch_corpus`")
        if verify and sha256_file(path) != entry["sha256"]:
            raise ValueError(f"{path}: sha256 does not match {manifest_path}; the file is corrupt or was "
                             f"edited. Restore it from git or rerun `python -m data.fetch_corpus`")
        paths.append(path)
    return paths


def iter_documents(paths: list[str] | None = None) -> Iterator[dict]:
    """Yield ``{"id", "text"}`` documents of the embedded corpus (MANIFEST order, then file order)."""
    for path in paths if paths is not None else embedded_files():
        with lzma.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)
