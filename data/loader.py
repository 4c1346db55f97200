"""Deterministic, resumable, data-parallel batches from a global sample stream (``BlendedSamples``).

Global sample i is ``samples.windows([i])`` (seq_len + 1 tokens; inputs = the first seq_len, targets = the
same window shifted by one). The stream is cut into micro global batches of ``micro_batch_size * dp_size``
samples; data-parallel rank r takes samples ``[r*mbs, (r+1)*mbs)`` of each. So optimizer step s with
``grad_accum`` A reads global samples ``[s*G, (s+1)*G)`` with G = mbs * dp * A, whatever the split of G into
mbs, dp and A. The position is one integer (global samples consumed), so a run resumes at another dp size,
micro batch or grad_accum as long as the global batch G is unchanged.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from data.blend import BlendedSamples
from data.sampling import ShardSet, SourceSamples

STATE_VERSION = 2


class ArrayShard:
    """An in-memory token array in the ``TokenShards`` interface (documents given by ``doc_lengths``)."""

    def __init__(self, tokens: np.ndarray, doc_lengths: np.ndarray | None = None):
        self.tokens = np.asarray(tokens)
        if self.tokens.ndim != 1:
            raise ValueError(f"expected a 1-D token stream, got shape {self.tokens.shape}")
        lengths = np.asarray([self.tokens.size] if doc_lengths is None else doc_lengths, np.int64)
        if lengths.sum() != self.tokens.size:
            raise ValueError("doc_lengths must sum to the number of tokens")
        self.dtype = self.tokens.dtype
        self.sequence_lengths = lengths
        self.sequence_pointers = np.concatenate([[0], np.cumsum(lengths)[:-1]]) * self.dtype.itemsize
        self.num_tokens = int(self.tokens.size)

    def __len__(self) -> int:
        return int(self.sequence_lengths.size)


def packed_samples(tokens, seq_len: int, seed: int = 0, shuffle: bool = True, name: str = "tokens",
                   doc_lengths: np.ndarray | None = None) -> BlendedSamples:
    """One in-memory token stream (or ``TokenShards``) as a sample stream: for scripts, benchmarks and tests."""
    shard = tokens if hasattr(tokens, "sequence_pointers") else ArrayShard(tokens, doc_lengths)
    docs = ShardSet([shard])
    return BlendedSamples([SourceSamples(docs, np.arange(len(docs)), seq_len, seed, shuffle, name=name)], [1.0])


def _check_rank(batch_size: int, dp_rank: int, dp_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")


def _to_torch(rows: np.ndarray | tuple[np.ndarray, np.ndarray], cp_rank: int = 0,
              cp_size: int = 1) -> tuple[torch.Tensor, ...]:
    """(inputs, targets), or with a window's segments (document masking) (inputs, targets, segments of the
    inputs). Context parallelism: the inputs and targets of tokens [c*T/cp, (c+1)*T/cp) of rank c; the segments
    of the whole sequence (attention sees all of it, parallel/context_parallel.py)."""
    rows, seg = rows if isinstance(rows, tuple) else (rows, None)
    n = (rows.shape[1] - 1) // cp_size
    lo = cp_rank * n
    out = (torch.from_numpy(rows[:, lo:lo + n].copy()), torch.from_numpy(rows[:, lo + 1:lo + n + 1].copy()))
    return out if seg is None else (*out, torch.from_numpy(seg[:, :-1].copy()))


class BatchLoader:
    """``next_batch() -> (inputs_BT, targets_BT)`` int64 tensors of shape [micro_batch_size, seq_len]; with
    ``document_mask`` also ``segments_BT`` (int32: each input token's document within its sample, for
    ``Transformer.forward(..., segments=)``). Context parallelism (``cp_size`` > 1): the ranks of a CP group read
    the same samples and each gets its 1/cp of the tokens (``_to_torch``)."""

    def __init__(self, samples: BlendedSamples, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 document_mask: bool = False, cp_rank: int = 0, cp_size: int = 1):
        _check_rank(micro_batch_size, dp_rank, dp_size)
        self.samples, self.seq_len, self.document_mask = samples, samples.seq_len, document_mask
        self.cp_rank, self.cp_size = cp_rank, cp_size
        self.micro_batch_size, self.dp_rank, self.dp_size = int(micro_batch_size), int(dp_rank), int(dp_size)
        self.global_batch_size = self.micro_batch_size * self.dp_size  # samples per micro step, all ranks
        self.samples_consumed = 0  # global samples consumed so far (all ranks advance together)

    @property
    def global_batches(self) -> int:
        return self.samples_consumed // self.global_batch_size

    @property
    def tokens_consumed(self) -> int:
        """Input tokens consumed by all data-parallel ranks together."""
        return self.samples_consumed * self.seq_len

    def tokens_per_source(self) -> dict[str, int]:
        """Input tokens consumed from each source so far (all ranks together)."""
        counts = self.samples.counts(self.samples_consumed)
        return {name: int(c) * self.seq_len for name, c in zip(self.samples.names, counts)}

    def sample_ids(self, global_batch: int) -> np.ndarray:
        """Global sample indices this rank reads for micro global batch number ``global_batch``."""
        start = global_batch * self.global_batch_size + self.dp_rank * self.micro_batch_size
        return np.arange(start, start + self.micro_batch_size, dtype=np.int64)

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        ids = self.sample_ids(self.global_batches)
        self.samples_consumed += self.global_batch_size
        return _to_torch(self.samples.windows(ids, segments=self.document_mask), self.cp_rank, self.cp_size)

    def __iter__(self) -> "BatchLoader":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def skip(self, n_global_batches: int) -> None:
        if n_global_batches < 0:
            raise ValueError(f"cannot skip a negative number of batches ({n_global_batches})")
        self.samples_consumed += int(n_global_batches) * self.global_batch_size

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "samples_consumed": self.samples_consumed,
                "stream": self.samples.identity()}

    def load_state_dict(self, state: dict) -> str | None:
        """Restore the position; the sources, weights, seed and token shards must match (dp may not). A new
        seq_len (a sequence-length stage) continues at the same number of tokens consumed, rounded up to a whole
        global batch (the new stream's samples are cut at other offsets and shuffled in another order, so the
        tokens themselves are not those the old stream would have read next); returns what changed, for the
        log."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')} != {STATE_VERSION} (checkpoint "
                             f"written by another version of the data pipeline)")
        mine = self.samples.identity()
        saved_len = int(state["stream"].get("seq_len", self.seq_len))
        for key, value in state["stream"].items():
            # a sequence-length stage changes seq_len, and with it the samples per epoch
            if mine.get(key) != value and not (saved_len != self.seq_len and key in ("seq_len", "samples_per_epoch")):
                hint = " (the token shards changed)" if key == "samples_per_epoch" else ""
                raise ValueError(f"data loader checkpoint has {key}={value} but this run uses {mine.get(key)}{hint}; "
                                 f"resume with the same data config")
        consumed = int(state["samples_consumed"])
        if saved_len != self.seq_len:  # continue at the same number of tokens consumed, rounded up to a global batch
            tokens, G = consumed * saved_len, self.global_batch_size
            self.samples_consumed = -(-tokens // (self.seq_len * G)) * G
            return (f"data.seq_len {saved_len} -> {self.seq_len}: the checkpoint consumed {tokens:,} tokens "
                    f"({consumed:,} samples); continuing at sample {self.samples_consumed:,} "
                    f"({self.tokens_consumed:,} tokens)")
        if consumed % self.global_batch_size:
            raise ValueError(f"data loader checkpoint is at global sample {consumed}, not a multiple of this run's "
                             f"micro_batch_size * dp_size = {self.global_batch_size}; resume with the same global batch")
        self.samples_consumed = consumed
        return None


def val_batch_count(batch_size: int, n_samples: int, dp_size: int = 1) -> int:
    """How many batches ``val_batches`` yields on each rank (the micro global batches of ``n_samples``)."""
    global_batch = batch_size * dp_size
    if n_samples < global_batch or n_samples % global_batch:
        raise ValueError(f"validation needs a positive multiple of {global_batch} samples, got {n_samples}")
    return n_samples // global_batch


def val_batches(samples: BlendedSamples, batch_size: int, n_samples: int, dp_rank: int = 0,
                dp_size: int = 1, document_mask: bool = False, cp_rank: int = 0,
                cp_size: int = 1) -> Iterator[tuple[torch.Tensor, ...]]:
    """The first ``n_samples`` global samples of ``samples`` (a multiple of batch_size * dp_size), in order:
    micro global batch b holds samples ``[b*G, (b+1)*G)`` with G = batch_size * dp_size; rank r yields its slice."""
    _check_rank(batch_size, dp_rank, dp_size)
    global_batch = batch_size * dp_size
    n_batches = val_batch_count(batch_size, n_samples, dp_size)

    def generate() -> Iterator[tuple[torch.Tensor, ...]]:
        for b in range(n_batches):
            start = b * global_batch + dp_rank * batch_size
            yield _to_torch(samples.windows(np.arange(start, start + batch_size), segments=document_mask), cp_rank,
                            cp_size)

    return generate()


def available_samples(samples: BlendedSamples) -> int:
    """How many global samples a validation stream has before any source would repeat (its first epoch)."""
    per_period = samples.blend.per_period
    limits = [s.samples_per_epoch for s in samples.sources]
    lo, hi = 0, min(lim * samples.blend.period // max(int(n), 1) + samples.blend.period
                    for lim, n in zip(limits, per_period) if n)
    while lo < hi:  # largest n with counts(n) <= limits
        mid = (lo + hi + 1) // 2
        if (samples.counts(mid) <= np.asarray(limits)).all():
            lo = mid
        else:
            hi = mid - 1
    return lo
