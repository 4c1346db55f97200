"""One host buffer per offloader, sub-allocated (``HostArena``): the optimizer states muonclip/offload.py keeps in
host memory and the activations parallel/activation_offload.py moves there.

CUDA's caching host allocator rounds every pinned allocation up to a power of two and keeps it cached when it is
freed (``torch.cuda.memory.host_memory_stats``: "Block sizes are rounded up to the next power of two"), so one
pinned tensor per offloaded tensor holds up to twice its bytes (a Kimi K2 expert master of 1.31 GiB takes 2 GiB).
The arena asks it for power-of-two chunks only, where the rounding adds nothing, and hands out ranges of them
aligned to ``ALIGN`` bytes (512: every dtype's alignment and the copy engines' preferred one), first fit, a freed
range merging with its free neighbours. Chunks are kept for the offloader's life, as the caching allocator keeps
its blocks: activation offload holds the most in its first step and reuses the same ranges after.

Growth: a chunk of ``CHUNK_BYTES`` (64 MiB) or, for a request above a quarter of that, of the power of two at or
above four times the request, so a chunk holds at least four requests of the size that opened it (a K2 expert
master opens an 8 GiB chunk that takes six) and what stays free at a chunk's end is at most about a quarter of it.
torch's ``save_on_cpu(pin_memory=True)`` pins each saved tensor (and so takes the rounding); DeepSpeed's
ZeRO-Offload keeps one flat pinned buffer per parameter group, the same idea as this arena.

A range is given back when the tensor handed out dies (a state tensor replaced by a loaded one, an activation's
host copy once backward has it back). The device copies that read or write a range must be ordered before the
next use of the range. Activation offload runs them all on its one side stream (a range taken again is written by
a later copy on that stream). The state offloader fetches on one stream and writes back on another
(muonclip/offload.py): its fetch stream waits for every write-back's event, the host has synchronised with its
copies before a step's loop returns (the write stream, which follows every lent group's fetch; the fetch stream
too where a fetched group was never lent), and its homes die only outside that loop; so a range given back has
no copy pending.

``ArenaLayout`` is the bookkeeping alone, without memory: the planner (parallel/plan.py) runs the requests it
predicts through it, so the host bytes it plans are the chunks the arena will allocate.
"""
from __future__ import annotations

import bisect
import collections
import threading
import weakref
from typing import Callable

import torch

ALIGN = 512
CHUNK_BYTES = 64 * 2**20  # read at construction: tests set smaller chunks


def _power_of_two_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class _FirstFit:
    """The largest free range of each chunk, in a max segment tree: the first chunk with a range of at least n
    bytes in O(log chunks) (a layout of a thousand micro batches' activations has tens of thousands of chunks)."""

    def __init__(self):
        self.size, self.tree = 1, [0, 0]

    def set(self, i: int, value: int) -> None:
        if i >= self.size:  # double the leaves, keeping the values
            leaves = self.tree[self.size:] + [0] * self.size
            self.size *= 2
            self.tree = [0] * self.size + leaves
            for j in range(self.size - 1, 0, -1):
                self.tree[j] = max(self.tree[2 * j], self.tree[2 * j + 1])
        j = i + self.size
        self.tree[j] = value
        while j > 1:
            j //= 2
            self.tree[j] = max(self.tree[2 * j], self.tree[2 * j + 1])

    def first_at_least(self, n: int) -> int:
        """The first chunk whose largest free range holds ``n`` bytes, or -1."""
        if self.tree[1] < n:
            return -1
        j = 1
        while j < self.size:
            j = 2 * j if self.tree[2 * j] >= n else 2 * j + 1
        return j - self.size


class ArenaLayout:
    """Chunks (power-of-two sizes) and the free ranges of each, sorted by offset; first fit."""

    def __init__(self, chunk_bytes: int | None = None, align: int = ALIGN):
        self.chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
        if self.chunk_bytes != _power_of_two_at_least(self.chunk_bytes) or self.chunk_bytes % align:
            raise ValueError(f"host arena: chunk_bytes must be a power of two >= {align}, got {self.chunk_bytes}")
        self.align = align
        self.chunks: list[int] = []  # sizes
        self._free: list[list[tuple[int, int]]] = []  # per chunk: (offset, size), by offset, none touching
        self.in_use = 0  # bytes of the ranges handed out (aligned)
        self._largest = _FirstFit()

    @property
    def reserved(self) -> int:
        """Bytes of all chunks: what the arena asked the host for."""
        return sum(self.chunks)

    def aligned(self, nbytes: int) -> int:
        return max(1, -(-nbytes // self.align)) * self.align

    def take(self, nbytes: int) -> tuple[int, int]:
        """(chunk, offset) of a free range of ``nbytes`` (rounded up to the alignment); a new chunk if none fits."""
        size = self.aligned(nbytes)
        self.in_use += size
        c = self._largest.first_at_least(size)
        if c < 0:
            chunk = self.chunk_bytes if 4 * size <= self.chunk_bytes else _power_of_two_at_least(4 * size)
            self.chunks.append(chunk)
            self._free.append([(size, chunk - size)] if chunk > size else [])
            self._update(len(self.chunks) - 1)
            return len(self.chunks) - 1, 0
        free = self._free[c]
        i, (offset, n) = next((i, r) for i, r in enumerate(free) if r[1] >= size)
        free[i:i + 1] = [(offset + size, n - size)] if n > size else []
        self._update(c)
        return c, offset

    def _update(self, c: int) -> None:
        self._largest.set(c, max((n for _, n in self._free[c]), default=0))

    def give_back(self, chunk: int, offset: int, nbytes: int) -> None:
        size = self.aligned(nbytes)
        free = self._free[chunk]
        i = bisect.bisect(free, (offset, 0))
        if i < len(free) and offset + size == free[i][0]:  # merge with the range after
            size += free.pop(i)[1]
        if i > 0 and free[i - 1][0] + free[i - 1][1] == offset:  # and the one before
            offset, size = free[i - 1][0], free[i - 1][1] + size
            i -= 1
            free.pop(i)
        free.insert(i, (offset, size))
        self.in_use -= self.aligned(nbytes)
        self._update(chunk)


class HostArena:
    """``take(nbytes)``: a uint8 host tensor of ``nbytes`` in a chunk; ``take_like(t)``: one of ``t``'s shape and
    dtype. ``allocate(nbytes)`` makes a chunk (the offloaders pass their device seam's host allocation, pinned on
    CUDA: muonclip/device_streams.py); plain host memory by default. Its range is free again once that tensor object
    is gone: a view taken of it does not keep it (torch's views refer to the chunk), so the offloaders keep the
    tensor itself as long as they use it (DCP, for one, loads into the tensor in place and drops its views).

    A range comes back from a finalizer, which may run on another thread (autograd's device thread in a CUDA
    backward) or inside this arena's own code (a garbage collection there): it is queued and given back under the
    lock by whoever holds it next, never waited for (a finalizer that waited on a lock its thread holds would hang)."""

    def __init__(self, allocate: Callable[[int], torch.Tensor] | None = None, chunk_bytes: int | None = None):
        self.allocate = allocate or (lambda nbytes: torch.empty(nbytes, dtype=torch.uint8))
        self.layout = ArenaLayout(chunk_bytes)
        self._chunks: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self._returned: collections.deque = collections.deque()  # ranges given back, not yet in the layout

    @property
    def reserved(self) -> int:
        """Bytes of the chunks allocated (the tensors themselves)."""
        return sum(chunk.numel() for chunk in self._chunks)

    def take(self, nbytes: int) -> torch.Tensor:
        return self._take(nbytes, lambda bytes_: bytes_)

    def take_like(self, t: torch.Tensor) -> torch.Tensor:
        return self._take(t.numel() * t.element_size(), lambda bytes_: bytes_.view(t.dtype).view(t.shape))

    def _take(self, nbytes: int, shape: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        with self._lock:
            self._drain()
            c, offset = self.layout.take(nbytes)
            if c == len(self._chunks):
                self._chunks.append(self.allocate(self.layout.chunks[c]))
        out = shape(self._chunks[c][offset:offset + nbytes])
        weakref.finalize(out, self._give_back, c, offset, nbytes)
        return out

    def _give_back(self, chunk: int, offset: int, nbytes: int) -> None:
        self._returned.append((chunk, offset, nbytes))
        if self._lock.acquire(blocking=False):
            try:
                self._drain()
            finally:
                self._lock.release()

    def _drain(self) -> None:
        while self._returned:
            self.layout.give_back(*self._returned.popleft())


__all__ = ["ALIGN", "CHUNK_BYTES", "ArenaLayout", "HostArena"]
