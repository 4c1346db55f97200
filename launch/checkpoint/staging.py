"""The host copy an asynchronous save writes from (``train.ckpt_async``): one buffer per saver, reused by every save.

``dcp.async_save`` stages the state before its thread writes it, so that training can go on changing the tensors.
Given no ``async_stager`` it stages through the ``FileSystemWriter`` (``BlockingAsyncStager`` without a cache, and
ours is a new writer per save): a fresh pageable copy of every tensor at every save, at Kimi K2 scale with
``optim.offload_state`` 16-37 GiB per GPU allocated, faulted in and freed every ``train.ckpt_interval`` steps, and
device tensors copied into pageable memory. ``StagingBuffer`` lays the state's tensors out in one host buffer, each
at a multiple of ``ALIGN`` bytes, allocated at the first save and kept: later saves copy into the same bytes (a
save whose tensors differ in names, shapes or dtypes lays out anew, dropping the old buffer first). On CUDA the
buffer is page-locked where it lies (``cudaHostRegister``, as DCP's own ``StateDictStager`` does) rather than taken
from the caching host allocator, which rounds a pinned allocation up to a power of two (up to twice the bytes);
device tensors are copied into it without blocking, and waited for once.

Each staged tensor is a view of the buffer with a storage of exactly its own bytes (``torch.frombuffer``), so DCP's
writer neither clones it (it clones a CPU tensor whose storage is larger than the tensor) nor writes more than it.
The saver waits for the save in flight before it stages the next one (save.py), so the buffer is never written
while the writer thread reads it.

Host-resident state (the offloaded optimizer state's arena, muonclip/offload.py) is copied too: the training
changes it while the thread writes. A synchronous save makes no copy of it (DCP writes host tensors as they are).

``staging_bytes`` is the buffer's size for the tensors' byte counts: the planner's figure (parallel/plan.py).

Megatron-LM's asynchronous save (``FileSystemWriterAsync.preload_tensors``) copies each device tensor with
``tensor.to("cpu", non_blocking=True)`` at every save: pinned blocks of the caching host allocator, which keeps them
for the next save but rounds each up to a power of two; it leaves host tensors uncopied (its forked writer process
sees them copy-on-write). Here the writer is a thread of the training process, so host state is copied, and
everything goes into one buffer of the exact size.
"""
from __future__ import annotations

import weakref
from typing import Any, Iterable

import torch
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.tensor import DTensor

from muonclip.host_arena import ALIGN  # every dtype's alignment and the copy engines' preferred one


def staging_bytes(sizes: Iterable[int]) -> int:
    """The buffer ``StagingBuffer`` allocates for tensors of these byte counts: each rounded up to ``ALIGN``."""
    return sum(_aligned(n) for n in sizes)


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


class StagingBuffer(AsyncStager):
    """``dcp.async_save(..., async_stager=...)``: ``stage`` copies the state dict's tensors (DTensors: their local
    shards) into the kept buffer and returns the state dict with those copies; everything else passes through."""

    _synchronize_after_execute = False  # stage() returns once the copy is complete

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None  # uint8, the staged tensors' memory
        self.allocations = 0  # how many buffers were allocated (one while the state keeps its layout)
        self._layout: tuple | None = None  # ((key, shape, dtype), ...) the buffer was laid out for
        self._views: dict[str, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel()

    @torch.no_grad()
    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        local = {k: (v._local_tensor if isinstance(v, DTensor) else v).detach()
                 for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
        self._lay_out(local)
        out, device = dict(state_dict), False
        for key, t in local.items():
            view = self._views[key]
            view.copy_(t, non_blocking=t.is_cuda)
            device |= t.is_cuda
            v = state_dict[key]
            out[key] = DTensor(view, v._spec, requires_grad=False) if isinstance(v, DTensor) else view
        if device:
            torch.cuda.current_stream().synchronize()  # the device -> host copies are complete
        return out

    def _lay_out(self, tensors: dict[str, torch.Tensor]) -> None:
        layout = tuple((k, tuple(t.shape), t.dtype) for k, t in tensors.items())
        if layout == self._layout:
            return
        self.close()  # the old buffer goes before the new one is allocated
        sizes = [t.numel() * t.element_size() for t in tensors.values()]
        buffer = torch.empty(staging_bytes(sizes), dtype=torch.uint8)
        if any(t.is_cuda for t in tensors.values()) and buffer.numel():
            _pin(buffer)
        memory, offset = buffer.numpy(), 0
        for (key, t), n in zip(tensors.items(), sizes):
            # a storage of exactly n bytes inside the buffer: the writer writes it without a clone
            view = torch.frombuffer(memory, dtype=t.dtype, count=t.numel(), offset=offset) if n else \
                torch.empty(0, dtype=t.dtype)
            self._views[key] = view.view(t.shape)
            offset += _aligned(n)
        self.buffer, self._layout = buffer, layout
        self.allocations += 1

    def close(self) -> None:
        self.buffer, self._layout, self._views = None, None, {}


def _pin(buffer: torch.Tensor) -> None:
    """Page-lock ``buffer`` where it lies (no power-of-two rounding), unlocked when it is freed."""
    cudart = torch.cuda.cudart()
    ptr, n = buffer.data_ptr(), buffer.numel()
    error = int(cudart.cudaHostRegister(ptr, n, 0))
    if error:
        raise RuntimeError(f"checkpoint staging: cudaHostRegister of {n} bytes failed (cudaError {error})")
    weakref.finalize(buffer, cudart.cudaHostUnregister, ptr)
