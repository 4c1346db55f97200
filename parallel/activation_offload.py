"""Activation CPU offload (``parallel.activation_offload``), Kimi K2's "all remaining activations are offloaded to
CPU RAM", streamed by a copy engine while the pipeline computes.

A saved-tensor hook pair (``torch.autograd.graph.saved_tensors_hooks``) around every block's forward: each tensor
autograd keeps for backward there (past the recompute boundary: with recomputation, what the recomputation keeps),
except weights and tensors under ``min_bytes``, is copied into host memory and dropped from the device; backward
gets it back. Regions that compress their saved tensors to FP8 (parallel/fp8_storage.py) hand
their tiles on to these hooks, so the FP8 copies travel to the host too: K2 offloads "all remaining activations".

A storage several ops save (or several views of it) is copied once, and each saved tensor comes back as its view
of the copy. On CUDA the host copies are pinned and run on a side stream (the device-to-host copy starts once the producing
kernel is issued, so micro batch i's activations travel while i+1 computes); when backward asks for a tensor, the
tensors the block forward before it kept (the next ones backward will need) are prefetched on the side stream, so
at most two blocks' tensors are back on the device at a time. On CPU the same mechanism runs with plain copies into distinct host tensors, counted in
``host_bytes`` (the CPU tests check gradients bitwise equal to no offload).
"""
from __future__ import annotations

from collections import deque
from typing import Any

import torch
from torch import nn

from parallel.regions import is_weight, param_storages, saved_tensors_chain


class _HostCopy:
    """One device storage's bytes in host memory (``host``), maybe on their way back (``fetched``); both are let go
    once every saved tensor that is a view of it has been handed back to backward (``views`` counts those left)."""

    __slots__ = ("host", "fetched", "event", "nbytes", "index", "consumed", "block_call", "views")

    def __init__(self, host: torch.Tensor, event: Any, index: int, block_call: int):
        self.host, self.event, self.index, self.block_call = host, event, index, block_call
        self.fetched: torch.Tensor | None = None
        self.nbytes = host.numel()
        self.consumed = False
        self.views = 0


class _Offloaded:
    """A saved tensor: a view (dtype, offset, shape, strides) of a storage copied to the host."""

    __slots__ = ("copy", "dtype", "offset", "shape", "stride")

    def __init__(self, copy: _HostCopy, t: torch.Tensor):
        self.copy, self.dtype = copy, t.dtype
        self.offset, self.shape, self.stride = t.storage_offset(), t.shape, t.stride()

    @property
    def nbytes(self) -> int:
        return self.copy.nbytes

    @property
    def host(self) -> torch.Tensor:
        return self.copy.host


class ActivationOffload:
    def __init__(self, min_bytes: int = 2**16):
        self.min_bytes = min_bytes
        self.device: torch.device | None = None  # the first offloaded tensor's (the model is built on meta)
        self.cuda = False
        self._stream = None
        self._copies: deque[_HostCopy] = deque()  # in pack order (the consumed ones before the first kept one go)
        # the storages copied in the running block's forward (held, so no new storage takes their address, and
        # released when it ends): a storage saved twice, or through several views, is copied once
        self._by_storage: dict[int, tuple[torch.Tensor, _HostCopy]] = {}
        self.host_bytes = 0  # held on the host now
        self.peak_host_bytes = 0
        self._storages: set[int] = set()
        self._base = 0  # the index of self._copies[0]
        self._block_calls = 0  # block forwards so far (a copy remembers the one it came from)

    # ------------------------------------------------------------------ hooks
    def pack(self, t: torch.Tensor) -> _Offloaded | None:
        storage = t.untyped_storage()
        if t.device.type == "meta" or storage.nbytes() < self.min_bytes or is_weight(t, self._storages):
            return None  # kept on the device (or by the hooks around)
        known = self._by_storage.get(storage.data_ptr())
        copy = known[1] if known is not None else self._copy_out(storage, t.device)
        if known is None:
            self._by_storage[storage.data_ptr()] = (t, copy)
        copy.views += 1
        return _Offloaded(copy, t)

    def _copy_out(self, storage: torch.UntypedStorage, device: torch.device) -> _HostCopy:
        if self.device is None:
            self.device, self.cuda = device, device.type == "cuda"
            self._stream = torch.cuda.Stream(self.device) if self.cuda else None
        raw = torch.empty(0, dtype=torch.uint8, device=device).set_(storage)
        host = torch.empty(raw.numel(), dtype=torch.uint8, device="cpu", pin_memory=self.cuda)
        event = None
        if self.cuda:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                host.copy_(raw, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
            raw.record_stream(self._stream)  # keep the device memory until the copy has read it
        else:
            host.copy_(raw)
        copy = _HostCopy(host, event, self._base + len(self._copies), self._block_calls)
        self._copies.append(copy)
        self.host_bytes += copy.nbytes
        self.peak_host_bytes = max(self.peak_host_bytes, self.host_bytes)
        return copy

    def unpack(self, packed: _Offloaded) -> torch.Tensor:
        copy = packed.copy
        if copy.fetched is None:
            self._fetch(copy)
        self._prefetch_before(copy)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(copy.event)
        out = torch.empty(0, dtype=packed.dtype, device=copy.fetched.device).set_(
            copy.fetched.untyped_storage(), packed.offset, packed.shape, packed.stride)
        copy.views -= 1
        if copy.views == 0:  # the last view is back: the host copy goes, the device one lives in what backward holds
            copy.consumed = True
            copy.host = copy.fetched = None
            self.host_bytes -= copy.nbytes
            while self._copies and self._copies[0].consumed:  # forget the consumed prefix
                self._copies.popleft()
                self._base += 1
        return out

    def _fetch(self, copy: _HostCopy) -> None:
        if self.cuda:
            with torch.cuda.stream(self._stream):
                self._stream.wait_event(copy.event)  # the device-to-host copy is done
                copy.fetched = copy.host.to(self.device, non_blocking=True)
                copy.event = torch.cuda.Event()
                copy.event.record(self._stream)
        else:
            copy.fetched = copy.host.clone()

    def _prefetch_before(self, copy: _HostCopy) -> None:
        """Start fetching the storages the block forward before ``copy``'s kept (backward needs them next)."""
        i = copy.index - self._base - 1
        while i >= 0 and self._copies[i].block_call >= copy.block_call - 1:
            earlier = self._copies[i]
            if not earlier.consumed and earlier.fetched is None:
                self._fetch(earlier)
            i -= 1

    # ------------------------------------------------------------------ per block
    def attach(self, block: nn.Module) -> None:
        """Run ``block``'s forward (and a checkpoint's saving of its inputs) under the hooks."""
        self._storages |= param_storages(block)
        contexts: list[Any] = []

        def enter(*_):
            # not while backward recomputes the block (full recompute): the recomputation keeps its own tensors
            if torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1:
                self._block_calls += 1
                ctx = saved_tensors_chain(self.pack, self.unpack)
                ctx.__enter__()
                contexts.append(ctx)

        def leave(*_):
            if contexts:
                contexts.pop().__exit__(None, None, None)
                self._by_storage.clear()

        block.register_forward_pre_hook(enter, prepend=True)  # before a checkpoint's pre-hook saves the inputs
        block.register_forward_hook(leave, always_call=True)


def apply_activation_offload(model: nn.Module) -> ActivationOffload:
    """Offload what every block keeps for backward; returns the offloader (its ``host_bytes`` counts)."""
    offload = ActivationOffload()
    for block in model.layers:
        offload.attach(block)
    return offload


__all__ = ["ActivationOffload", "apply_activation_offload"]
