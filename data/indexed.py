"""Token shards in the megatron-core IndexedDataset layout (``prefix.bin`` + ``prefix.idx``).

``.idx`` (little endian): magic b"MMIDIDX\\x00\\x00", u64 version (1), u8 dtype code, u64 sequence count S,
u64 document count D, int32 sequence lengths [S], int64 sequence byte pointers [S], int64 document
indices [D] (D = documents + 1, starting at 0 and ending at S). ``.bin``: the tokens, back to back.
prepare() writes one sequence per document (EOS appended), so sequences == documents.
"""
from __future__ import annotations

import os
import struct

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
               7: np.float32, 8: np.uint16}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count


def token_dtype(vocab_size: int) -> type:
    """uint16 when every id fits (vocab < 65536), else int32."""
    return np.uint16 if vocab_size < 65536 else np.int32


def dtype_code(dtype) -> int:
    for code, dt in DTYPE_CODES.items():
        if np.dtype(dt) == np.dtype(dtype):
            return code
    raise ValueError(f"dtype {dtype} has no megatron IndexedDataset code")


class IndexedWriter:
    """Streaming writer: ``add_documents(tokens_flat, lengths)`` any number of times, then ``close()``."""

    def __init__(self, prefix: str, dtype):
        self.prefix, self.dtype = prefix, np.dtype(dtype)
        self._bin = open(prefix + ".bin", "wb")
        self._lengths: list[np.ndarray] = []

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        tokens, lengths = np.asarray(tokens), np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != tokens.size or (lengths < 0).any():
            raise ValueError("lengths must be non-negative and sum to the number of tokens")
        if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token ids out of range for {self.dtype}")
        self._bin.write(tokens.astype(self.dtype, copy=False).tobytes())
        self._lengths.append(lengths)

    def close(self) -> None:
        self._bin.flush()
        os.fsync(self._bin.fileno())  # data on disk before prepare() renames the directory into place
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        if lengths.size and lengths.max() > np.iinfo(np.int32).max:
            raise ValueError("a document is longer than 2**31-1 tokens")
        pointers = np.zeros(lengths.size, np.int64)
        np.cumsum(lengths[:-1] * self.dtype.itemsize, out=pointers[1:])
        doc_indices = np.arange(lengths.size + 1, dtype=np.int64)
        with open(self.prefix + ".idx", "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, dtype_code(self.dtype), lengths.size, doc_indices.size))
            f.write(lengths.astype(np.int32).tobytes())
            f.write(pointers.tobytes())
            f.write(doc_indices.tobytes())
            f.flush()
            os.fsync(f.fileno())

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self._bin.close()


class TokenShards:
    """Read-only view of ``prefix.bin``/``prefix.idx`` with full validation of the layout.

    ``tokens``: np.memmap of the whole token stream; ``sequence_lengths``/``doc_lengths``: int64 arrays;
    ``len()``: number of sequences (== documents for files written by prepare()); ``[i]``: sequence i.
    """

    def __init__(self, prefix: str):
        self.prefix = str(prefix)
        idx_path, bin_path = self.prefix + ".idx", self.prefix + ".bin"
        for path in (idx_path, bin_path):
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} not found: run data.prepare() to build the token shards")
        fix = "delete it (and its .bin/.idx partner) and rerun data.prepare()"

        def bad(path: str, what: str) -> ValueError:
            return ValueError(f"{path}: {what}; the file is truncated or corrupt: {fix}")

        with open(idx_path, "rb") as f:
            raw = f.read()
        if len(raw) < _HEADER.size:
            raise bad(idx_path, f"only {len(raw)} bytes, shorter than the {_HEADER.size}-byte header")
        magic, version, code, n_seq, n_doc = _HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise bad(idx_path, f"bad magic {magic!r} (expected {MAGIC!r}, megatron MMIDIDX format)")
        if version != VERSION:
            raise bad(idx_path, f"unsupported version {version} (expected {VERSION})")
        if code not in DTYPE_CODES:
            raise bad(idx_path, f"unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = _HEADER.size + 12 * n_seq + 8 * n_doc
        if len(raw) != expected:
            raise bad(idx_path, f"size {len(raw)} bytes, expected {expected} for {n_seq} sequences")
        off = _HEADER.size
        lengths = np.frombuffer(raw, np.int32, n_seq, off).astype(np.int64)
        pointers = np.frombuffer(raw, np.int64, n_seq, off + 4 * n_seq)
        doc_indices = np.frombuffer(raw, np.int64, n_doc, off + 12 * n_seq).copy()
        expected_ptr = np.zeros(n_seq, np.int64)
        np.cumsum(lengths[:-1] * self.dtype.itemsize, out=expected_ptr[1:])
        if (lengths < 0).any() or not np.array_equal(pointers, expected_ptr):
            raise bad(idx_path, "sequence lengths and pointers are inconsistent")
        if n_doc < 1 or doc_indices[0] != 0 or doc_indices[-1] != n_seq or (np.diff(doc_indices) < 0).any():
            raise bad(idx_path, "document indices are inconsistent")
        n_tokens = int(lengths.sum())
        bin_size = os.path.getsize(bin_path)
        if bin_size != n_tokens * self.dtype.itemsize:
            raise bad(bin_path, f"size {bin_size} bytes, but {idx_path} describes {n_tokens} tokens "
                                f"of {self.dtype} ({n_tokens * self.dtype.itemsize} bytes)")
        self.sequence_lengths, self.sequence_pointers, self.document_indices = lengths, pointers, doc_indices
        cum = np.concatenate([[0], np.cumsum(lengths)])
        self.doc_lengths = cum[doc_indices[1:]] - cum[doc_indices[:-1]]
        self.num_tokens = n_tokens
        self.tokens = (np.memmap(bin_path, dtype=self.dtype, mode="r") if n_tokens
                       else np.zeros(0, self.dtype))

    def __len__(self) -> int:
        return int(self.sequence_lengths.size)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize
        return self.tokens[start:start + int(self.sequence_lengths[i])]

    def __repr__(self) -> str:
        return f"TokenShards({self.prefix!r}, sequences={len(self)}, tokens={self.num_tokens}, dtype={self.dtype})"
