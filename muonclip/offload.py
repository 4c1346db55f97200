"""Optimizer-state offload (``optim.offload_state``): the owner's float32 master weights, Muon momentum and AdamW
moments live in host memory and are lent to the device one group (a ZeRO-1 bucket, or one parameter) at a time for
the update.

Kimi K2 offloads part of its optimizer states to CPU at 32 nodes; Megatron's offload is Adam-only. Here every
state tensor of a parameter (except AdamW's step counter, a CPU scalar anyway) has a home in host memory, pinned
on CUDA. ``lend_in_turn(groups)`` yields each group with device copies swapped into its state dicts and puts the
homes back (with the updated values) when the next group is asked for; at most two groups are on the device. On
CUDA the copies run on one side stream: the next group's fetch is issued before the current one's update, but the
compute stream waits for everything issued on the side stream (that fetch and the previous write-back included), so
copies and updates do not overlap yet (issue #28 item 6: fetch and write-back on two streams ordered by events); a
group's write-back starts once its update has been issued (the side stream waits for the compute stream; a tensor the
update put in place of a lent one belongs to the compute stream and is recorded on the side stream, so the caching
allocator keeps it until its copy home has read it); the step waits for the last write-back before returning, so
the host values are complete for a checkpoint. The device operations go through muonclip/device_streams.py, whose
recording fake (tests/fake_streams.py) checks these rules on a CPU. On CPU the same mechanism runs with plain
copies between distinct tensors (what the CPU tests check: results bitwise equal to no offload, state at home
between steps).

The homes are ranges of one arena (muonclip/host_arena.py), not a pinned allocation each, which CUDA's host
allocator would round up to a power of two; the planner counts its chunks (parallel/plan.py).
"""
from __future__ import annotations

import weakref
from typing import Any, Iterator

import torch
from torch import Tensor

from muonclip.device_streams import SyncStreams, device_streams
from muonclip.host_arena import HostArena

StateDict = dict[str, Any]


def _offloaded(key: str, value: Any) -> bool:
    return isinstance(value, Tensor) and key != "step"


class StateOffload:
    def __init__(self, device: torch.device, streams: SyncStreams | None = None):
        self.device = torch.device(device)
        self.streams = streams or device_streams(self.device)  # the device operations (muonclip/device_streams.py)
        self._stream = self.streams.new_stream()  # the copies' stream
        self._homes: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # id -> a host tensor this made
        # the homes' memory (muonclip/host_arena.py), its chunks pinned on CUDA
        self.arena = HostArena(lambda nbytes: self.streams.empty((nbytes,), torch.uint8, self.device, host=True))

    def send_home(self, state: StateDict) -> None:
        """Give every offloaded tensor of ``state`` a home in host memory (pinned on CUDA): new state, or state
        loaded from a checkpoint onto the device."""
        for key, value in state.items():
            if _offloaded(key, value) and not self.is_home(value):
                host = self.arena.take_like(value)
                host.copy_(value)
                self._homes[id(host)] = host
                state[key] = host

    def is_home(self, t: Tensor) -> bool:
        return self._homes.get(id(t)) is t

    def _fetch(self, group: list[StateDict]) -> list[StateDict]:
        """Device copies of each state dict's offloaded tensors (started on the side stream on CUDA)."""
        s = self.streams
        with s.use(self._stream):
            return [{k: s.copy_(s.empty(v.shape, v.dtype, self.device), v)
                     for k, v in st.items() if _offloaded(k, v)} for st in group]

    def _store(self, group: list[StateDict], homes: list[StateDict]) -> None:
        """Copy the updated device tensors back into their homes and put the homes back into the state dicts."""
        s = self.streams
        s.wait_stream(self._stream, s.current())  # after the update was issued
        for st, home in zip(group, homes):
            for key, host in home.items():
                on_device = st[key]
                with s.use(self._stream):
                    s.copy_(host, on_device)
                s.record_stream(on_device, self._stream)  # a tensor the update made (the lent ones are the side's)
                st[key] = host

    def lend_in_turn(self, groups: list[list[StateDict]]) -> Iterator[list[StateDict]]:
        """Yield each group of state dicts holding device copies; the homes are back (updated) once the loop ends."""
        s = self.streams
        fetched = self._fetch(groups[0]) if groups else None
        try:
            for i, group in enumerate(groups):
                current, fetched = fetched, (self._fetch(groups[i + 1]) if i + 1 < len(groups) else None)
                s.wait_stream(s.current(), self._stream)  # the fetch is done before the update reads it
                homes = [{k: st[k] for k in copies} for st, copies in zip(group, current)]
                for st, copies in zip(group, current):
                    st.update(copies)
                try:
                    yield group
                finally:
                    self._store(group, homes)
                    current = copies = None  # freed before the next fetch allocates: two groups on the device
        finally:
            s.synchronize(self._stream)
