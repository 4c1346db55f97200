"""Synthetic Megatron prefixes of any number of documents for scale tests and benchmarks: the ``.idx`` is
written in chunks (bounded memory) and the ``.bin`` is a sparse file of the right size (all token ids 0), so
200M documents cost 4 GB of index on disk and no token blocks."""
from __future__ import annotations

import numpy as np

from data.indexed import _HEADER, MAGIC, VERSION, dtype_code

_CHUNK = 1 << 22


def write_synthetic_prefix(prefix: str, n_docs: int, mean_len: int, seed: int = 0,
                           dtype=np.uint16) -> int:
    """Documents of 1..2*mean_len-1 tokens (uniform); returns the number of tokens."""
    itemsize = np.dtype(dtype).itemsize
    rng = np.random.default_rng(seed)
    with open(prefix + ".idx", "wb") as f:
        f.write(_HEADER.pack(MAGIC, VERSION, dtype_code(dtype), n_docs, n_docs + 1))
        chunks = []
        for a in range(0, n_docs, _CHUNK):
            lengths = rng.integers(1, 2 * mean_len, min(_CHUNK, n_docs - a), dtype=np.int32)
            f.write(lengths.tobytes())
            chunks.append(int(lengths.sum(dtype=np.int64)))
        rng = np.random.default_rng(seed)  # the same lengths again, for the pointers
        pointer = 0
        for a in range(0, n_docs, _CHUNK):
            lengths = rng.integers(1, 2 * mean_len, min(_CHUNK, n_docs - a), dtype=np.int32)
            sizes = lengths.astype(np.int64) * itemsize
            pointers = np.cumsum(sizes) - sizes + pointer
            f.write(pointers.tobytes())
            pointer += int(sizes.sum())
        for a in range(0, n_docs + 1, _CHUNK):
            f.write(np.arange(a, min(a + _CHUNK, n_docs + 1), dtype=np.int64).tobytes())
    n_tokens = sum(chunks)
    with open(prefix + ".bin", "wb") as f:
        f.truncate(n_tokens * itemsize)  # sparse
    return n_tokens
