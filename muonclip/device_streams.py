"""The device operations the two offloaders use (``muonclip/offload.py``, ``parallel/activation_offload.py``), behind
one small seam: allocate (device, or host memory pinned on CUDA), copy, streams, events, waits and
``record_stream``. Memory is freed by dropping the last reference, as everywhere in torch: what the caching
allocator then does with it is the rule the offloaders must respect, and the reason for the seam.

CUDA's caching allocator ties a block to the stream that allocated it and hands it to that stream's next
allocation as soon as the block's last reference dies, even if a kernel queued on another stream still reads it;
so a tensor used on a stream other than its own needs ``record_stream(that stream)`` (the block waits for the
stream to pass the point where it was freed; recording the allocating stream is ignored), or its own stream must
wait for the use first (an event or ``wait_stream``). Pinned host blocks are safe: a non-blocking copy records an
event on them, and the host allocator reuses them only once it has passed.

``CudaStreams`` runs the real ``torch.cuda`` streams and events; ``SyncStreams`` (CPU, and any device without
streams) is the plain synchronous path: one implicit stream, copies complete when issued. Tests hand the offloaders
a recording fake (tests/fake_streams.py) that enforces the allocator's rule on CPU. Here in ``muonclip`` because
the optimizer's offload uses it and ``muonclip`` depends on nothing else of the project (``parallel`` imports
``muonclip``, not the reverse).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, ContextManager

import torch
from torch import Tensor


class SyncStreams:
    """Synchronous: no streams (``None``), no events; copies finish before they return."""

    def new_stream(self) -> Any:
        return None

    def current(self) -> Any:
        return None

    def use(self, stream: Any) -> ContextManager:
        """Issue what runs inside on ``stream`` (and allocate there)."""
        return nullcontext()

    def empty(self, shape, dtype: torch.dtype, device: torch.device, host: bool = False) -> Tensor:
        """Uninitialised memory on ``device`` (allocated on the current stream), or ``host`` memory."""
        return torch.empty(shape, dtype=dtype, device="cpu" if host else device)

    def copy_(self, dst: Tensor, src: Tensor) -> Tensor:
        """``dst.copy_(src)`` issued on the current stream (non-blocking where it can be)."""
        return dst.copy_(src)

    def record_event(self, stream: Any) -> Any:
        return None

    def wait_event(self, stream: Any, event: Any) -> None:
        """``stream`` runs what is issued on it next after ``event``."""

    def wait_stream(self, stream: Any, other: Any) -> None:
        """``stream`` runs what is issued on it next after what has been issued on ``other`` so far."""

    def record_stream(self, t: Tensor, stream: Any) -> None:
        """``t``'s memory is not reused before ``stream`` has passed the point where its last reference dies."""

    def synchronize(self, stream: Any) -> None:
        """The host waits until ``stream`` has run what was issued on it."""


class CudaStreams(SyncStreams):
    def __init__(self, device: torch.device):
        self.device = torch.device(device)

    def new_stream(self) -> torch.cuda.Stream:
        return torch.cuda.Stream(self.device)

    def current(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def use(self, stream: torch.cuda.Stream) -> ContextManager:
        return torch.cuda.stream(stream)

    def empty(self, shape, dtype: torch.dtype, device: torch.device, host: bool = False) -> Tensor:
        if host:
            return torch.empty(shape, dtype=dtype, device="cpu", pin_memory=True)
        return torch.empty(shape, dtype=dtype, device=device)

    def copy_(self, dst: Tensor, src: Tensor) -> Tensor:
        return dst.copy_(src, non_blocking=True)

    def record_event(self, stream: torch.cuda.Stream) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def wait_event(self, stream: torch.cuda.Stream, event: torch.cuda.Event) -> None:
        stream.wait_event(event)

    def wait_stream(self, stream: torch.cuda.Stream, other: torch.cuda.Stream) -> None:
        stream.wait_stream(other)

    def record_stream(self, t: Tensor, stream: torch.cuda.Stream) -> None:
        t.record_stream(stream)

    def synchronize(self, stream: torch.cuda.Stream) -> None:
        stream.synchronize()


def device_streams(device: torch.device) -> SyncStreams:
    """The implementation for ``device``: real streams on CUDA, the synchronous one elsewhere."""
    device = torch.device(device)
    return CudaStreams(device) if device.type == "cuda" else SyncStreams()


__all__ = ["CudaStreams", "SyncStreams", "device_streams"]
