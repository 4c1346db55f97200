"""Activation CPU offload (``parallel.activation_offload``), Kimi K2's "all remaining activations are offloaded to
CPU RAM", streamed by a copy engine while the pipeline computes.

A saved-tensor hook pair (``torch.autograd.graph.saved_tensors_hooks``) around every block's forward: each tensor
autograd keeps for backward there (past the recompute boundary: with recomputation, what the recomputation keeps),
except weights and tensors under ``min_bytes``, is copied into host memory and dropped from the device; backward
gets it back. Regions that compress their saved tensors to FP8 (parallel/fp8_storage.py) hand
their tiles on to these hooks, so the FP8 copies travel to the host too: K2 offloads "all remaining activations".

A storage several ops save (or several views of it) is copied once, and each saved tensor comes back as its view
of the copy. On CUDA the host copies are pinned and run on a side stream (the device-to-host copy starts once the
producing kernel is issued, so micro batch i's activations travel while i+1 computes); when backward asks for a
tensor, the rest of its block's and those of the block before it in the same chain (the block whose output was its
input: the next ones backward needs) are fetched on the side stream, so at most two blocks' tensors are back on the
device at a time, under interleaved pipeline schedules too (there the block that ran just before a stage's first one
belongs to another stage or micro batch, whose backward comes later). What comes back is allocated on the side
stream and read by backward on the compute stream: it is recorded on the compute stream, so the caching allocator
does not hand it to the next fetch before backward has read it; what goes out is recorded on the side stream
until its copy has read it. The device operations go through muonclip/device_streams.py, whose recording fake
(tests/fake_streams.py) checks these rules on a CPU. On CPU the same mechanism runs with plain copies into
distinct host tensors, counted in ``host_bytes`` (the CPU tests check gradients bitwise equal to no offload).
"""
from __future__ import annotations

import weakref
from collections import deque
from typing import Any

import torch
from torch import nn

from muonclip.device_streams import SyncStreams, device_streams
from muonclip.host_arena import HostArena
from parallel.regions import is_weight, param_storages, saved_tensors_chain


class _HostCopy:
    """One device storage's bytes in host memory (``host``), maybe on their way back (``fetched``); both are let go
    once every saved tensor that is a view of it has been handed back to backward (``views`` counts those left).
    ``block_call``: the block forward it came from; ``chain``: the run of consecutive block forwards, each taking
    the previous one's output, that it belongs to (one micro batch through one pipeline stage)."""

    __slots__ = ("host", "fetched", "event", "nbytes", "index", "consumed", "block_call", "chain", "views")

    def __init__(self, host: torch.Tensor, event: Any, index: int, block_call: int, chain: int):
        self.host, self.event, self.index, self.block_call, self.chain = host, event, index, block_call, chain
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
    def __init__(self, min_bytes: int = 2**16, streams: SyncStreams | None = None):
        self.min_bytes = min_bytes
        self.device: torch.device | None = None  # the first offloaded tensor's (the model is built on meta)
        self.streams = streams  # the device operations (muonclip/device_streams.py): the device's unless given
        self._side = None  # the copies' stream
        self._copies: deque[_HostCopy] = deque()  # in pack order (the consumed ones before the first kept one go)
        # the storages copied in the running block's forward (held, so no new storage takes their address, and
        # released when it ends): a storage saved twice, or through several views, is copied once
        self._by_storage: dict[int, tuple[torch.Tensor, _HostCopy]] = {}
        self.host_bytes = 0  # held on the host now
        self.peak_host_bytes = 0
        self._storages: set[int] = set()
        self._base = 0  # the index of self._copies[0]
        self._block_calls = 0  # block forwards so far (a copy remembers the one it came from)
        self._chains = 0  # chains of block forwards so far (a copy remembers its own)
        self._last_output: weakref.ref | None = None  # the last block forward's output: does the next one continue?
        self.arena: HostArena | None = None  # the host copies' memory, made with the first (pinned on CUDA)

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
            self.device = device
            self.streams = self.streams or device_streams(device)
            self._side = self.streams.new_stream()
        s = self.streams
        raw = torch.empty(0, dtype=torch.uint8, device=device).set_(storage)
        host = self._host(raw.numel())
        s.wait_stream(self._side, s.current())  # after the kernels that wrote it
        with s.use(self._side):
            s.copy_(host, raw)
            event = s.record_event(self._side)
        s.record_stream(raw, self._side)  # keep the device memory until the copy has read it
        copy = _HostCopy(host, event, self._base + len(self._copies), self._block_calls, self._chains)
        self._copies.append(copy)
        self.host_bytes += copy.nbytes
        self.peak_host_bytes = max(self.peak_host_bytes, self.host_bytes)
        return copy

    def unpack(self, packed: _Offloaded) -> torch.Tensor:
        copy = packed.copy
        if copy.fetched is None:
            self._fetch(copy)
        self._prefetch_before(copy)
        s, current = self.streams, self.streams.current()
        s.wait_event(current, copy.event)  # the copy is back
        # backward reads it on this stream after the side stream's allocation is let go: without this the side
        # stream's next fetch of the same size would reuse the memory before the backward kernels have read it
        s.record_stream(copy.fetched, current)
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
        s = self.streams
        with s.use(self._side):
            s.wait_event(self._side, copy.event)  # the device-to-host copy is done
            copy.fetched = s.empty(copy.host.shape, torch.uint8, self.device)
            s.copy_(copy.fetched, copy.host)
            copy.event = s.record_event(self._side)

    def _prefetch_before(self, copy: _HostCopy) -> None:
        """Start fetching the storages ``copy``'s block and the block before it in its chain kept (backward needs
        them next). Not the block that ran before a chain's first one: that is another micro batch's or another
        stage's (interleaved 1F1B runs stage 0's and stage 2's forwards in turn on one rank), whose backward comes
        later; fetched now, it would stay on the device beside the two blocks backward works on."""
        i = copy.index - self._base - 1
        while i >= 0 and self._copies[i].chain == copy.chain and self._copies[i].block_call >= copy.block_call - 1:
            earlier = self._copies[i]
            if not earlier.consumed and earlier.fetched is None:
                self._fetch(earlier)
            i -= 1

    # ------------------------------------------------------------------ per block
    def attach(self, block: nn.Module) -> None:
        """Run ``block``'s forward (and a checkpoint's saving of its inputs) under the hooks."""
        self._storages |= param_storages(block)
        contexts: list[Any] = []

        def enter(_, args):
            # not while backward recomputes the block (full recompute): the recomputation keeps its own tensors
            if torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1:
                previous = self._last_output() if self._last_output is not None else None
                if previous is None or not args or args[0] is not previous:
                    self._chains += 1  # a new micro batch, or a new stage's input
                self._block_calls += 1
                ctx = saved_tensors_chain(self.pack, self.unpack)
                ctx.__enter__()
                contexts.append(ctx)

        def leave(_, args, output):
            if contexts:
                contexts.pop().__exit__(None, None, None)
                self._by_storage.clear()
                self._last_output = weakref.ref(output) if isinstance(output, torch.Tensor) else None

        block.register_forward_pre_hook(enter, prepend=True)  # before a checkpoint's pre-hook saves the inputs
        block.register_forward_hook(leave, always_call=True)

    def _host(self, nbytes: int) -> torch.Tensor:
        """``nbytes`` of host memory in this offloader's arena (muonclip/host_arena.py), free again when the copy
        holding it lets it go (``unpack``: the last view is back). A range taken again is written by a later copy on
        the side stream, after the fetch that read it."""
        if self.arena is None:
            self.arena = HostArena(lambda n: self.streams.empty((n,), torch.uint8, self.device, host=True))
        return self.arena.take(nbytes)


def apply_activation_offload(model: nn.Module) -> ActivationOffload:
    """Offload what every block keeps for backward; returns the offloader (its ``host_bytes`` counts)."""
    offload = ActivationOffload()
    for block in model.layers:
        offload.attach(block)
    return offload


__all__ = ["ActivationOffload", "apply_activation_offload"]
