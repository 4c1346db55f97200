"""Token shards in the megatron-core IndexedDataset layout (``prefix.bin`` + ``prefix.idx``).

``.idx`` (little endian): magic b"MMIDIDX\\x00\\x00", u64 version (1), u8 dtype code, u64 sequence count S,
u64 document count D, int32 sequence lengths [S], int64 sequence byte pointers [S], int64 document
indices [D] (D = documents + 1, starting at 0 and ending at S). ``.bin``: the tokens, back to back.
data.preprocess writes one sequence per document (EOS appended), so sequences == documents.
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


def byte_pointers(lengths: np.ndarray, start: int, itemsize: int) -> np.ndarray:
    """Byte offset of each sequence in the .bin: ``start`` plus the sizes of the sequences before it (int64)."""
    sizes = np.asarray(lengths, np.int64) * itemsize
    pointers = np.empty_like(sizes)
    if sizes.size:
        pointers[0] = start
        np.cumsum(sizes[:-1], out=pointers[1:])
        pointers[1:] += start
    return pointers


def dtype_code(dtype) -> int:
    for code, dt in DTYPE_CODES.items():
        if np.dtype(dt) == np.dtype(dtype):
            return code
    raise ValueError(f"dtype {dtype} has no megatron IndexedDataset code")


class IndexedWriter:
    """Streaming writer: ``add_documents(tokens_flat, lengths)`` any number of times, then ``close()``.

    Memory stays bounded whatever the number of documents: lengths go to a side file as they arrive and
    the ``.idx`` is written from it in chunks. ``max_token`` is the largest id written (-1 when empty).
    """

    _CHUNK = 1 << 22  # documents per chunk when writing the .idx

    def __init__(self, prefix: str, dtype):
        self.prefix, self.dtype = prefix, np.dtype(dtype)
        self._bin = open(prefix + ".bin", "wb")
        self._lengths_path = prefix + ".lengths.tmp"
        self._lengths = open(self._lengths_path, "wb")
        self.documents = self.num_tokens = 0
        self.max_token = -1

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        tokens, lengths = np.asarray(tokens), np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != tokens.size or (lengths < 0).any():
            raise ValueError("lengths must be non-negative and sum to the number of tokens")
        if lengths.size and lengths.max() > np.iinfo(np.int32).max:
            raise ValueError("a document is longer than 2**31-1 tokens")
        if tokens.size:
            if tokens.min() < 0 or tokens.max() > np.iinfo(self.dtype).max:
                raise ValueError(f"token ids out of range for {self.dtype}")
            self.max_token = max(self.max_token, int(tokens.max()))
        self._bin.write(tokens.astype(self.dtype, copy=False).tobytes())
        self._lengths.write(lengths.astype(np.int32).tobytes())
        self.documents += int(lengths.size)
        self.num_tokens += int(tokens.size)

    def close(self) -> None:
        self._bin.flush()
        os.fsync(self._bin.fileno())  # data on disk before the caller renames the files into place
        self._bin.close()
        self._lengths.close()
        n = self.documents
        lengths = np.memmap(self._lengths_path, np.int32, "r", shape=(n,)) if n else np.zeros(0, np.int32)
        with open(self.prefix + ".idx", "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, dtype_code(self.dtype), n, n + 1))
            for a in range(0, n, self._CHUNK):
                f.write(np.asarray(lengths[a:a + self._CHUNK]).tobytes())
            pointer = 0
            for a in range(0, n, self._CHUNK):
                chunk = np.asarray(lengths[a:a + self._CHUNK], np.int64)
                f.write(byte_pointers(chunk, pointer, self.dtype.itemsize).tobytes())
                pointer += int(chunk.sum()) * self.dtype.itemsize
            for a in range(0, n + 1, self._CHUNK):
                f.write(np.arange(a, min(a + self._CHUNK, n + 1), dtype=np.int64).tobytes())
            f.flush()
            os.fsync(f.fileno())
        del lengths
        os.remove(self._lengths_path)

    def abort(self) -> None:
        """Close and delete everything written so far."""
        for f in (self._bin, self._lengths):
            f.close()
        for path in (self.prefix + ".bin", self.prefix + ".idx", self._lengths_path):
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _monotone_from_0_to(values: np.ndarray, last: int, chunk: int) -> bool:
    """values[0] == 0, values[-1] == last and never decreasing, read in chunks (bounded memory)."""
    if values.size < 1 or values[0] != 0 or values[-1] != last:
        return False
    for a in range(0, values.size - 1, chunk):
        if (np.diff(np.asarray(values[a:a + chunk + 1])) < 0).any():
            return False
    return True


class TokenShards:
    """Read-only view of ``prefix.bin``/``prefix.idx`` with full validation of the layout.

    ``tokens``: np.memmap of the whole token stream; ``sequence_lengths`` (int32) / ``sequence_pointers``
    (int64): memory-mapped from the .idx; ``len()``: number of sequences (== documents for files written by
    data.preprocess); ``[i]``: sequence i. Validation reads the index in chunks (bounded memory).

    ``num_tokens`` given (the data builder validated these files in this run and recorded their token count,
    data/documents.py): only the header and the file sizes are checked, without the pass over the index that
    costs O(documents) on every rank.
    """

    _CHUNK = 1 << 20

    def __init__(self, prefix: str, num_tokens: int | None = None):
        self.prefix = str(prefix)
        idx_path, bin_path = self.prefix + ".idx", self.prefix + ".bin"
        for path in (idx_path, bin_path):
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} not found: build the token shards with `python -m data.preprocess` "
                                        f"(or name raw text files in data.sources)")
        fix = "delete it (and its .bin/.idx partner) and rebuild it (python -m data.preprocess)"

        def bad(path: str, what: str) -> ValueError:
            return ValueError(f"{path}: {what}; the file is truncated or corrupt: {fix}")

        idx_size = os.path.getsize(idx_path)
        with open(idx_path, "rb") as f:
            head = f.read(_HEADER.size)
        if len(head) < _HEADER.size:
            raise bad(idx_path, f"only {len(head)} bytes, shorter than the {_HEADER.size}-byte header")
        magic, version, code, n_seq, n_doc = _HEADER.unpack_from(head)
        if magic != MAGIC:
            raise bad(idx_path, f"bad magic {magic!r} (expected {MAGIC!r}, megatron MMIDIDX format)")
        if version != VERSION:
            raise bad(idx_path, f"unsupported version {version} (expected {VERSION})")
        if code not in DTYPE_CODES:
            raise bad(idx_path, f"unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = _HEADER.size + 12 * n_seq + 8 * n_doc
        if idx_size != expected:
            raise bad(idx_path, f"size {idx_size} bytes, expected {expected} for {n_seq} sequences")
        off = _HEADER.size

        def view(dtype, count: int, offset: int) -> np.ndarray:
            return np.memmap(idx_path, dtype, "r", offset, (count,)) if count else np.zeros(0, dtype)

        lengths = view(np.int32, n_seq, off)
        pointers = view(np.int64, n_seq, off + 4 * n_seq)
        doc_indices = view(np.int64, n_doc, off + 12 * n_seq)
        n_tokens = 0 if num_tokens is None else int(num_tokens)
        checked = n_seq if num_tokens is None else 0  # pointers must be the running byte offsets of the lengths
        for a in range(0, checked, self._CHUNK):
            chunk = np.asarray(lengths[a:a + self._CHUNK], np.int64)
            expected_ptr = byte_pointers(chunk, n_tokens * self.dtype.itemsize, self.dtype.itemsize)
            if (chunk < 0).any() or not np.array_equal(np.asarray(pointers[a:a + self._CHUNK]), expected_ptr):
                raise bad(idx_path, "sequence lengths and pointers are inconsistent")
            n_tokens += int(chunk.sum())
        if num_tokens is None and not _monotone_from_0_to(doc_indices, n_seq, self._CHUNK):
            raise bad(idx_path, "document indices are inconsistent")
        bin_size = os.path.getsize(bin_path)
        if bin_size != n_tokens * self.dtype.itemsize:
            raise bad(bin_path, f"size {bin_size} bytes, but {idx_path} describes {n_tokens} tokens "
                                f"of {self.dtype} ({n_tokens * self.dtype.itemsize} bytes)")
        self.sequence_lengths, self.sequence_pointers, self.document_indices = lengths, pointers, doc_indices
        self.num_tokens = n_tokens
        self.tokens = (np.memmap(bin_path, dtype=self.dtype, mode="r") if n_tokens
                       else np.zeros(0, self.dtype))

    def __len__(self) -> int:
        return int(self.sequence_lengths.size)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize
        return self.tokens[start:start + int(self.sequence_lengths[i])]

    def max_token(self) -> int:
        """Largest token id in the .bin (-1 when empty); one chunked pass over the file."""
        top = -1
        for a in range(0, self.num_tokens, 1 << 26):
            top = max(top, int(self.tokens[a:a + (1 << 26)].max()))
        return top

    def __repr__(self) -> str:
        return f"TokenShards({self.prefix!r}, sequences={len(self)}, tokens={self.num_tokens}, dtype={self.dtype})"
