"""Deterministic, resumable batches from a packed token stream.

Sample k is the window ``tokens[k*seq_len : k*seq_len + seq_len + 1]`` (inputs = first seq_len tokens,
targets = the same window shifted by one). Epoch e visits the samples in the order of a permutation
seeded with ``seed + e`` and is cut into global batches of ``micro_batch_size * dp_size`` samples (the
remainder is dropped); data-parallel rank r takes samples ``[r*mbs, (r+1)*mbs)`` of each global batch.
The position is one integer (global batches consumed), so a run can resume at another dp_size as long
as the global batch size is unchanged.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

STATE_VERSION = 1


def _token_stream(shards) -> np.ndarray:
    tokens = shards.tokens if hasattr(shards, "tokens") else np.asarray(shards)
    if tokens.ndim != 1:
        raise ValueError(f"expected a 1-D token stream, got shape {tokens.shape}")
    return tokens


def _check_rank(seq_len: int, batch_size: int, dp_rank: int, dp_size: int) -> None:
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch size must be >= 1, got {seq_len} and {batch_size}")
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")


def _windows(tokens: np.ndarray, sample_ids: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows_BT = np.stack([tokens[s * seq_len:s * seq_len + seq_len + 1] for s in sample_ids]).astype(np.int64)
    return torch.from_numpy(rows_BT[:, :-1].copy()), torch.from_numpy(rows_BT[:, 1:].copy())


class BatchLoader:
    """``next_batch() -> (inputs_BT, targets_BT)`` int64 tensors of shape [micro_batch_size, seq_len]."""

    def __init__(self, shards, seq_len: int, micro_batch_size: int, seed: int, dp_rank: int = 0,
                 dp_size: int = 1):
        _check_rank(seq_len, micro_batch_size, dp_rank, dp_size)
        self.tokens = _token_stream(shards)
        self.seq_len, self.micro_batch_size, self.seed = int(seq_len), int(micro_batch_size), int(seed)
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)
        self.global_batch_size = self.micro_batch_size * self.dp_size
        self.n_samples = max(0, (len(self.tokens) - 1) // self.seq_len)
        self.batches_per_epoch = self.n_samples // self.global_batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(self.tokens)} tokens give {self.n_samples} samples of seq_len={seq_len}, "
                             f"fewer than one global batch of {self.global_batch_size}; use a smaller "
                             f"seq_len or batch size, or more data")
        self.global_batches = 0  # global batches consumed so far (all ranks advance together)
        self._perm_epoch, self._perm = -1, np.zeros(0, np.int64)

    @property
    def epoch(self) -> int:
        return self.global_batches // self.batches_per_epoch

    @property
    def tokens_consumed(self) -> int:
        """Input tokens consumed by all data-parallel ranks together."""
        return self.global_batches * self.global_batch_size * self.seq_len

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.Generator(np.random.PCG64(self.seed + epoch))
            self._perm, self._perm_epoch = rng.permutation(self.n_samples), epoch
        return self._perm

    def sample_ids(self, global_batch: int) -> np.ndarray:
        """Sample indices this rank reads for global batch number ``global_batch``."""
        epoch, index = divmod(global_batch, self.batches_per_epoch)
        start = index * self.global_batch_size + self.dp_rank * self.micro_batch_size
        return self._permutation(epoch)[start:start + self.micro_batch_size]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.sample_ids(self.global_batches)
        self.global_batches += 1
        return _windows(self.tokens, ids, self.seq_len)

    def __iter__(self) -> "BatchLoader":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def skip(self, n_global_batches: int) -> None:
        if n_global_batches < 0:
            raise ValueError(f"cannot skip a negative number of batches ({n_global_batches})")
        self.global_batches += int(n_global_batches)

    def state_dict(self) -> dict[str, int]:
        epoch, index = divmod(self.global_batches, self.batches_per_epoch)
        return {"version": STATE_VERSION, "seed": self.seed, "seq_len": self.seq_len,
                "global_batch_size": self.global_batch_size, "n_samples": self.n_samples,
                "epoch": epoch, "batch_in_epoch": index, "global_batches": self.global_batches}

    def load_state_dict(self, state: dict) -> None:
        """Restore the position; the seed, seq_len, global batch size and data must match (dp_size may not)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')} != {STATE_VERSION}")
        for field in ("seq_len", "global_batch_size", "seed", "n_samples"):
            if int(state[field]) != getattr(self, field):
                hint = " (micro_batch_size * dp_size)" if field == "global_batch_size" else ""
                raise ValueError(f"data loader checkpoint has {field}={state[field]}{hint} but this run uses "
                                 f"{getattr(self, field)}; resume with the same value (n_samples differs when "
                                 f"the token shards changed)")
        if state["epoch"] * self.batches_per_epoch + state["batch_in_epoch"] != state["global_batches"]:
            raise ValueError(f"inconsistent data loader state {state}")
        self.global_batches = int(state["global_batches"])


def val_batches(shards, seq_len: int, batch_size: int, max_batches: int | None = None, dp_rank: int = 0,
                dp_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Validation windows in stream order (no shuffle): global batch b holds samples
    ``[b*G, (b+1)*G)`` with G = batch_size * dp_size; rank r yields its ``batch_size`` slice."""
    _check_rank(seq_len, batch_size, dp_rank, dp_size)
    tokens = _token_stream(shards)
    global_batch = batch_size * dp_size
    n_batches = max(0, (len(tokens) - 1) // seq_len) // global_batch
    if n_batches == 0:
        raise ValueError(f"validation stream of {len(tokens)} tokens is too small for one batch of "
                         f"{global_batch} x {seq_len}; lower seq_len/batch size or raise val_fraction")
    if max_batches is not None:
        n_batches = min(n_batches, int(max_batches))

    def generate() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b in range(n_batches):
            start = b * global_batch + dp_rank * batch_size
            yield _windows(tokens, np.arange(start, start + batch_size), seq_len)

    return generate()
