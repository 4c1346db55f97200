"""Optimizer-state offload (``optim.offload_state``): the owner's float32 master weights, Muon momentum and AdamW
moments live in host memory and are lent to the device one group (a ZeRO-1 bucket, or one parameter) at a time for
the update.

Kimi K2 offloads part of its optimizer states to CPU at 32 nodes; Megatron's offload is Adam-only. Here every
state tensor of a parameter (except AdamW's step counter, a CPU scalar anyway) has a home in host memory, pinned
on CUDA. ``lend_in_turn(groups)`` yields each group with device copies swapped into its state dicts and puts the
homes back (with the updated values) when the next group is asked for. On CUDA the fetches run on one side stream
and the write-backs on another, ordered by events only where data requires it (U: an update on the compute
stream, F: a fetch, W: a write-back; group i's):

- U(i) waits for F(i)'s event only: it runs while F(i+1) and W(i-1) are on the copy engines;
- W(i) waits for the compute stream's event after U(i) (so after F(i) too: its home is read before it is written);
- F(i+2) waits for W(i)'s event: it takes group i's device memory, which the fetch stream allocated (the caching
  allocator reuses a block on its own stream once it dies, so the fetch stream must have waited for every other
  stream's use of it first: U(i) through W(i)). Exactly two groups are on the device, as the planner counts
  (parallel/plan.py).

With u, w, f an update's, a write-back's and a fetch's time, a group then takes max(u, (u + w + f) / 2) in steady
state (the copy engines run both directions at once), against u + w + f with both copies on one stream; a third
group on the device would give max(u, w, f).

A tensor the update put in place of a lent one belongs to the compute stream and is recorded on the write stream,
so the allocator keeps it until its copy home has read it (the lent ones are not recorded: that would hold their
blocks until the host saw the write-back finish, and a host running ahead would allocate more). The step waits
for the last write-back before returning (the write stream is ordered after every lent group's fetch too), so the
host values are complete for a checkpoint; a group fetched and never lent (an update raised) is waited for as well.

The homes are ranges of one arena (muonclip/host_arena.py), not a pinned allocation each, which CUDA's host
allocator would round up to a power of two; the planner counts its chunks (parallel/plan.py). Two streams touch
them, so the arena's argument (a range taken again is used after the copies that used it before) rests on events
and the host: a fetch is ordered after every write-back issued before it (the fetch stream waits for each W's
event), the host has synchronised with every copy of a range before ``lend_in_turn`` returns (the write stream's,
and the fetch stream's where a fetched group was never lent), and a home dies (its range given back) only outside
``lend_in_turn`` (the loop keeps each home it lends). A range given back has no copy pending, and what writes it
next, the host (``send_home``) or a later copy, comes after every copy that used it.

The device operations go through muonclip/device_streams.py, whose recording fake (tests/fake_streams.py) checks
these rules on a CPU. On CPU the same mechanism runs with plain copies between distinct tensors (what the CPU tests
check: results bitwise equal to no offload, state at home between steps).
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
        self._fetches = self.streams.new_stream()  # host -> device copies (the lent copies are allocated here)
        self._writes = self.streams.new_stream()  # device -> host copies
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

    def _fetch(self, group: list[StateDict]) -> tuple[list[StateDict], Any]:
        """Device copies of each state dict's offloaded tensors, started on the fetch stream, and their event."""
        s = self.streams
        with s.use(self._fetches):
            copies = [{k: s.copy_(s.empty(v.shape, v.dtype, self.device), v)
                       for k, v in st.items() if _offloaded(k, v)} for st in group]
            return copies, s.record_event(self._fetches)

    def _store(self, group: list[StateDict], homes: list[StateDict], lent: list[StateDict]) -> None:
        """Copy the updated device tensors back into their homes on the write stream and put the homes back into
        the state dicts; the fetch stream waits for these copies before its next fetch, which reuses their memory."""
        s = self.streams
        s.wait_event(self._writes, s.record_event(s.current()))  # after the update was issued
        with s.use(self._writes):
            for st, home in zip(group, homes):
                for key, host in home.items():
                    s.copy_(host, st[key])
            written = s.record_event(self._writes)
        for st, home, copies in zip(group, homes, lent):
            for key, host in home.items():
                if st[key] is not copies[key]:  # a tensor the update made (the compute stream's)
                    s.record_stream(st[key], self._writes)
                st[key] = host
        s.wait_event(self._fetches, written)  # the lent copies die next: their blocks are the fetch stream's

    def lend_in_turn(self, groups: list[list[StateDict]]) -> Iterator[list[StateDict]]:
        """Yield each group of state dicts holding device copies; the homes are back (updated) once the loop ends."""
        s = self.streams
        fetched = self._fetch(groups[0]) if groups else None
        try:
            for i, group in enumerate(groups):
                (current, ready), fetched = fetched, (self._fetch(groups[i + 1]) if i + 1 < len(groups) else None)
                s.wait_event(s.current(), ready)  # this group's fetch only, not the next one's nor a write-back
                homes = [{k: st[k] for k in copies} for st, copies in zip(group, current)]
                for st, copies in zip(group, current):
                    st.update(copies)
                try:
                    yield group
                finally:
                    self._store(group, homes, current)
                    current = copies = None  # freed before the next fetch allocates: two groups on the device
        finally:
            if fetched is not None:  # fetched, never lent (the loop stopped early): its homes are still being read
                s.synchronize(self._fetches)
            s.synchronize(self._writes)
