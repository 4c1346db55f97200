"""Samples of one source: Megatron GPTDataset order over a document subset, indices cached per epoch.

A source is a ``ShardSet`` (one or more ``TokenShards``; a "document" is one sequence of the .idx, as in
megatron-core) and a subset of its documents (the training or the held-out split). Epoch e:
1. ``rs = numpy.random.RandomState(seed + e)``; the document order is ``rs.shuffle`` of the subset;
2. the documents are concatenated in that order and cut into samples of ``seq_len + 1`` tokens starting every
   ``seq_len`` tokens (sample k = tokens [k*seq_len, k*seq_len + seq_len]; inputs are the first seq_len tokens,
   targets the last seq_len), so ``(tokens_per_epoch - 1) // seq_len`` samples per epoch;
3. the sample order is ``rs.shuffle(arange(samples))`` with the same generator.
For epoch 0 this is exactly megatron-core 0.16.1's GPTDataset (random_seed=seed, one epoch; tested against it);
later epochs reshuffle with seed + e (megatron-core shuffles all epochs jointly up front instead, which needs
the number of epochs in advance). ``shuffle=False`` (validation) keeps the subset order and sample order.

Source sample j is sample ``j % S`` of epoch ``j // S``: there is no end, a run may go on for any number of
epochs. With a ``cache_dir`` each epoch's index (document order, token offsets, sample order) is built once,
written atomically as one ``.npy`` and memory-mapped (processes share it through the page cache); without one
it is built in memory. The caller keys ``cache_dir`` by everything the index depends on (data/sources.py).
"""
from __future__ import annotations

import os

import numpy as np

from data.indexed import TokenShards

INDEX_VERSION = 1
SPLIT_SEED = 1234  # the held-out split does not move with data.seed


class ShardSet:
    """The documents of several ``TokenShards`` as one sequence (shard order, then document order).

    ``lengths``: every document's token count. One shard: its memory-mapped .idx lengths. Several: the
    ``lengths`` given (the memory-mapped copy data/documents.py builds once), else concatenated in memory at first use.
    """

    def __init__(self, shards: list[TokenShards], lengths: np.ndarray | None = None):
        if not shards:
            raise ValueError("a source needs at least one token shard")
        self.shards = shards
        self.doc_offsets = np.cumsum([0] + [len(s) for s in shards])
        if lengths is not None and len(lengths) != self.doc_offsets[-1]:
            raise ValueError(f"{len(lengths)} document lengths for {self.doc_offsets[-1]} documents")
        self._lengths = shards[0].sequence_lengths if lengths is None and len(shards) == 1 else lengths

    @property
    def lengths(self) -> np.ndarray:
        if self._lengths is None:  # built on first use only
            self._lengths = np.concatenate([np.asarray(s.sequence_lengths) for s in self.shards])
        return self._lengths

    def __len__(self) -> int:
        return int(self.doc_offsets[-1])

    def read(self, doc: int, offset: int, length: int) -> np.ndarray:
        shard = int(np.searchsorted(self.doc_offsets, doc, "right")) - 1
        s = self.shards[shard]
        start = int(s.sequence_pointers[doc - self.doc_offsets[shard]]) // s.dtype.itemsize + offset
        return s.tokens[start:start + length]


def held_out_count(n_docs: int, val_fraction: float, where: str = "source") -> int:
    """Documents held out for validation: ``round(n * val_fraction)``, at least 1 when the fraction is positive;
    an error when nothing would be left for training."""
    n_val = 0 if val_fraction == 0 else max(1, round(n_docs * val_fraction))
    if n_val >= n_docs:
        raise ValueError(f"{where}: val_fraction={val_fraction} leaves no training documents ({n_docs} documents); "
                         f"lower data.val_fraction or give data.val_sources")
    return n_val


def split_documents(n_docs: int, val_fraction: float, where: str = "source") -> tuple[np.ndarray, np.ndarray]:
    """Document-level held-out split: ``held_out_count`` documents, chosen by a fixed-seed permutation, are
    validation. Returns sorted (train_ids, val_ids). In memory (~17 bytes per document); data/documents.py
    builds the same split once into memory-mapped files for the trainer."""
    n_val = held_out_count(n_docs, val_fraction, where)
    val = np.sort(np.random.RandomState(SPLIT_SEED).permutation(n_docs)[:n_val])
    mask = np.ones(n_docs, bool)
    mask[val] = False
    return np.flatnonzero(mask), val


class SourceSamples:
    """``windows(js)``: token windows [len(js), seq_len + 1] (int64) of source samples ``js`` (any epoch).

    ``doc_ids``: the subset (a memory map is kept as one); ``tokens``: their token count when known (else summed
    here, a gather of every subset document's length)."""

    def __init__(self, docs: ShardSet, doc_ids: np.ndarray, seq_len: int, seed: int, shuffle: bool = True,
                 cache_dir: str | None = None, name: str = "source", tokens: int | None = None):
        self.docs, self.name = docs, name
        integer = isinstance(doc_ids, np.ndarray) and doc_ids.dtype.kind in "iu"
        self.doc_ids = doc_ids if integer else np.asarray(doc_ids, np.int64)  # a memory map stays one
        self.seq_len, self.seed, self.shuffle, self.cache_dir = int(seq_len), int(seed), shuffle, cache_dir
        self.tokens_per_epoch = (int(np.asarray(docs.lengths)[self.doc_ids].sum(dtype=np.int64)) if tokens is None
                                 else int(tokens))
        self.samples_per_epoch = max(0, (self.tokens_per_epoch - 1) // self.seq_len)
        if self.samples_per_epoch == 0:
            raise ValueError(f"data source {name}: {self.tokens_per_epoch} tokens in {len(self.doc_ids)} documents, "
                             f"fewer than one sample of seq_len + 1 = {self.seq_len + 1} tokens")
        self._epochs: dict[int, tuple] = {}

    def epoch_path(self, epoch: int) -> str | None:
        return os.path.join(self.cache_dir, f"epoch_{epoch:05d}.npy") if self.cache_dir else None

    def build_epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(document order, token offsets [n_docs + 1], sample order or None) of ``epoch``; cached."""
        if epoch in self._epochs:
            return self._epochs[epoch]
        path = self.epoch_path(epoch)
        if path is not None and os.path.exists(path):
            index = _split_index(np.load(path, mmap_mode="r"))
        else:
            index = self._compute(epoch, path)
        if len(self._epochs) >= 2:  # a run reads one epoch at a time (two at a boundary)
            self._epochs.pop(min(self._epochs))
        self._epochs[epoch] = index
        return index

    def _compute(self, epoch: int, path: str | None):
        n_docs, n_samples = len(self.doc_ids), self.samples_per_epoch
        rs = np.random.RandomState((self.seed + epoch) % 2**32)
        # a plain ndarray copy: RandomState.shuffle swaps the items of a subclass (np.memmap) one by one in Python
        order = np.array(self.doc_ids, np.int32 if len(self.docs) < 2**31 else np.int64)
        if self.shuffle:
            rs.shuffle(order)
        perm = None
        if self.shuffle:
            perm = np.arange(n_samples, dtype=np.uint32 if n_samples < 2**32 - 1 else np.int64)
            rs.shuffle(perm)
        if path is None:
            cum = np.zeros(n_docs + 1, np.int64)
            _offsets(self.docs.lengths, order, cum)
            return order.astype(np.int64), cum, perm
        # one int64 file: [n_docs, n_samples, order (n_docs), offsets (n_docs + 1), sample order (n_samples or 0)]
        from data.preprocess import remove_stale_tmp

        os.makedirs(self.cache_dir, exist_ok=True)
        remove_stale_tmp(path)  # a half-written index of a killed build
        tmp = f"{path}.tmp-{os.getpid()}.npy"
        size = 2 + n_docs + n_docs + 1 + (n_samples if perm is not None else 0)
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int64, shape=(size,))
        out[0], out[1] = n_docs, n_samples if perm is not None else 0
        out[2:2 + n_docs] = order
        _offsets(self.docs.lengths, order, out[2 + n_docs:3 + 2 * n_docs])
        if perm is not None:
            out[3 + 2 * n_docs:] = perm
        out.flush()
        del out
        os.replace(tmp, path)  # another rank may have written the same file meanwhile: same bytes
        return _split_index(np.load(path, mmap_mode="r"))

    def windows(self, js: np.ndarray, segments: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """With ``segments``: also [len(js), seq_len + 1] int32, the index of each token's document within its
        window (0 for the document the window starts in, then 1, 2, ...): document masking's boundaries, exact
        from the index (no EOS token needed)."""
        js = np.asarray(js, np.int64)
        L = self.seq_len
        out = np.empty((len(js), L + 1), np.int64)
        seg = np.empty((len(js), L + 1), np.int32) if segments else None
        epochs, local = np.divmod(js, self.samples_per_epoch)
        lengths = self.docs.lengths
        for epoch in np.unique(epochs):
            order, cum, perm = self.build_epoch(int(epoch))
            rows = np.flatnonzero(epochs == epoch)
            picks = local[rows] if perm is None else np.asarray(perm[local[rows]], np.int64)
            for row, k in zip(rows, picks):
                start = int(k) * L
                p = int(np.searchsorted(cum, start, "right")) - 1
                pos, filled, piece = start - int(cum[p]), 0, 0
                while filled < L + 1:
                    doc = int(order[p])
                    take = min(L + 1 - filled, int(lengths[doc]) - pos)
                    out[row, filled:filled + take] = self.docs.read(doc, pos, take)
                    if seg is not None:
                        seg[row, filled:filled + take] = piece
                    filled, pos, p, piece = filled + take, 0, p + 1, piece + (take > 0)
        return out if seg is None else (out, seg)


def _offsets(lengths: np.ndarray, order: np.ndarray, cum: np.ndarray, chunk: int = 1 << 22) -> None:
    """cum = [0, running token counts of the documents in ``order``], gathered in chunks (a gather of all at
    once holds int64 indices and the lengths beside ``order``: 12 bytes per document)."""
    cum[0] = total = 0
    for a in range(0, len(order), chunk):
        part = np.cumsum(np.asarray(lengths[order[a:a + chunk]], np.int64))
        cum[1 + a:1 + a + part.size] = part + total
        total += int(part[-1])


def _split_index(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    n_docs, n_samples = int(arr[0]), int(arr[1])
    order = arr[2:2 + n_docs]
    cum = arr[2 + n_docs:3 + 2 * n_docs]
    perm = arr[3 + 2 * n_docs:3 + 2 * n_docs + n_samples] if n_samples else None
    return order, cum, perm
