"""A source's document table, built once and memory-mapped by every rank: its held-out split, the ids and token
counts of each part, and (several shards) every document's length.

Each rank computing these itself costs O(documents) of private memory per rank: a permutation of every
document, a mask, the id arrays, a gather of lengths (measured ~13.5 bytes per document on a waiting rank,
~22 on rank 0: 2 billion documents x 8 ranks would be ~230 GB of host memory per node). Instead the data
builder (rank 0, data/sources.py) writes the table once under

    <data_dir>/index/<source>-docs-<key>/   train.npy, val.npy   sorted document ids (int32 below 2**31
                                                                 documents, else int64); val.npy only when
                                                                 documents are held out
                                            lengths.npy          int32, only for sources of several shards
                                            table.json           counts, token sums, each shard's tokens

keyed by (the source's content key, its document count, ``val_fraction``, the split seed), built in a temporary
directory and renamed into place. Every rank opens the ``.npy`` files memory-mapped (shared through the page
cache), and reads the token counts from table.json instead of summing lengths.

The split is ``data.sampling.split_documents``'s (the same ids, tested): the builder holds one int32 permutation
and a mask while it builds (5 bytes per document, on that one process, once).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Callable

import numpy as np

from data.preprocess import building_dir
from data.sampling import SPLIT_SEED, ShardSet, held_out_count

TABLE_VERSION = 1
_CHUNK = 1 << 22  # documents per chunk while writing (bounded memory besides the permutation and the mask)


@dataclasses.dataclass
class DocumentTable:
    path: str  # its directory
    documents: int
    train: np.ndarray  # memory-mapped, sorted
    val: np.ndarray | None  # memory-mapped, sorted; None when nothing is held out
    train_tokens: int
    val_tokens: int
    shard_tokens: list[int]
    lengths: np.ndarray | None  # memory-mapped; None for one shard (its .idx has them)


def table_dir(data_dir: str, name: str, key: str, documents: int, val_fraction: float) -> str:
    digest = hashlib.sha256(json.dumps({"v": TABLE_VERSION, "key": key, "documents": int(documents),
                                        "val_fraction": float(val_fraction), "split_seed": SPLIT_SEED},
                                       sort_keys=True).encode()).hexdigest()
    return os.path.join(data_dir, "index", f"{name}-docs-{digest[:16]}")


def build_table(docs: ShardSet, folder: str, val_fraction: float, where: str,
                log: Callable[[str], None] = print) -> None:
    """Write the table of ``docs`` into ``folder`` (nothing when it is already there)."""
    if os.path.exists(os.path.join(folder, "table.json")):
        return
    n = len(docs)
    n_val = held_out_count(n, val_fraction, where)
    id_dtype = np.int32 if n < 2**31 else np.int64
    t0 = time.perf_counter()
    if n >= _CHUNK:
        log(f"data: {where}: building its document table ({n:,} documents, {n_val:,} held out) in {folder}")
    with building_dir(folder, "table.json") as tmp:
        if len(docs.shards) > 1:
            out = np.lib.format.open_memmap(os.path.join(tmp, "lengths.npy"), "w+", np.int32, (n,))
            for shard, start in zip(docs.shards, docs.doc_offsets):
                for a in range(0, len(shard), _CHUNK):
                    out[start + a:start + min(a + _CHUNK, len(shard))] = shard.sequence_lengths[a:a + _CHUNK]
            out.flush()
            del out
            all_lengths = np.load(os.path.join(tmp, "lengths.npy"), mmap_mode="r")
        else:
            all_lengths = docs.shards[0].sequence_lengths
        keep = np.ones(n, bool)
        if n_val:
            order = np.arange(n, dtype=id_dtype)  # the same stream as RandomState(SPLIT_SEED).permutation(n)
            np.random.RandomState(SPLIT_SEED).shuffle(order)
            val = np.sort(order[:n_val])
            del order
            keep[val] = False
            np.save(os.path.join(tmp, "val.npy"), val)
            del val
        train = np.lib.format.open_memmap(os.path.join(tmp, "train.npy"), "w+", id_dtype, (n - n_val,))
        filled = train_tokens = total = 0
        for a in range(0, n, _CHUNK):
            mask = keep[a:a + _CHUNK]
            ids = np.flatnonzero(mask).astype(id_dtype) + id_dtype(a)
            train[filled:filled + ids.size] = ids
            filled += ids.size
            lengths = np.asarray(all_lengths[a:a + _CHUNK], np.int64)
            total += int(lengths.sum())
            train_tokens += int(lengths[mask].sum())
        train.flush()
        del train, keep, all_lengths
        meta = {"version": TABLE_VERSION, "documents": n, "train_documents": n - n_val, "val_documents": n_val,
                "train_tokens": train_tokens, "val_tokens": total - train_tokens, "val_fraction": val_fraction,
                "split_seed": SPLIT_SEED, "shard_tokens": [int(s.num_tokens) for s in docs.shards]}
        with open(os.path.join(tmp, "table.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
    if n >= _CHUNK:
        log(f"data: {where}: document table built ({time.perf_counter() - t0:.1f} s)")


def open_table(folder: str) -> DocumentTable:
    """The table in ``folder``, memory-mapped; a clear error when it is missing or damaged."""
    meta_path = os.path.join(folder, "table.json")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)

        def load(name: str, count: int) -> np.ndarray:
            arr = np.load(os.path.join(folder, name), mmap_mode="r")
            if arr.shape != (count,):
                raise ValueError(f"{name} holds {arr.shape} entries, table.json says {count}")
            return arr

        train = load("train.npy", meta["train_documents"])
        val = load("val.npy", meta["val_documents"]) if meta["val_documents"] else None
        lengths = load("lengths.npy", meta["documents"]) if len(meta["shard_tokens"]) > 1 else None
        return DocumentTable(folder, meta["documents"], train, val, meta["train_tokens"], meta["val_tokens"],
                             meta["shard_tokens"], lengths)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"document table {folder}: {e.filename} is missing; the data builder (rank 0) "
                                f"writes it before the other ranks open it (is data.data_dir on a filesystem "
                                f"every rank shares?)") from None
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"document table {folder} is damaged ({type(e).__name__}: {e}); delete the directory "
                         f"and it is rebuilt") from None
