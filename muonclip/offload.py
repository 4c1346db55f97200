"""Optimizer-state offload (``optim.offload_state``): the owner's float32 master weights, Muon momentum and AdamW
moments live in host memory and are lent to the device one group (a ZeRO-1 bucket, or one parameter) at a time for
the update.

Kimi K2 offloads part of its optimizer states to CPU at 32 nodes; Megatron's offload is Adam-only. Here every
state tensor of a parameter (except AdamW's step counter, a CPU scalar anyway) has a home in host memory, pinned
on CUDA. ``lend_in_turn(groups)`` yields each group with device copies swapped into its state dicts and puts the
homes back (with the updated values) when the next group is asked for. On CUDA the copies run on a side stream:
the next group is fetched while the current one is updated, and a group's write-back starts once its update has
been issued (``record_stream`` keeps the device copy alive until then); the step waits for the last write-back
before returning, so the host values are complete for a checkpoint. On CPU the same mechanism runs with plain
copies between distinct tensors (what the CPU tests check: results bitwise equal to no offload, state at home
between steps).
"""
from __future__ import annotations

import weakref
from typing import Any, Iterator

import torch
from torch import Tensor

StateDict = dict[str, Any]


def _offloaded(key: str, value: Any) -> bool:
    return isinstance(value, Tensor) and key != "step"


class StateOffload:
    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._homes: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # id -> a host tensor this made

    def send_home(self, state: StateDict) -> None:
        """Give every offloaded tensor of ``state`` a home in host memory (pinned on CUDA): new state, or state
        loaded from a checkpoint onto the device."""
        for key, value in state.items():
            if _offloaded(key, value) and not self.is_home(value):
                host = torch.empty(value.shape, dtype=value.dtype, device="cpu", pin_memory=self.cuda)
                host.copy_(value)
                self._homes[id(host)] = host
                state[key] = host

    def is_home(self, t: Tensor) -> bool:
        return self._homes.get(id(t)) is t

    def _fetch(self, group: list[StateDict]) -> list[StateDict]:
        """Device copies of each state dict's offloaded tensors (started on the side stream on CUDA)."""
        if not self.cuda:
            return [{k: v.clone() for k, v in st.items() if _offloaded(k, v)} for st in group]
        with torch.cuda.stream(self._stream):
            return [{k: v.to(self.device, non_blocking=True) for k, v in st.items() if _offloaded(k, v)}
                    for st in group]

    def _store(self, group: list[StateDict], homes: list[StateDict]) -> None:
        """Copy the updated device tensors back into their homes and put the homes back into the state dicts."""
        if self.cuda:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))  # after the update was issued
        for st, home in zip(group, homes):
            for key, host in home.items():
                on_device = st[key]
                if self.cuda:
                    with torch.cuda.stream(self._stream):
                        host.copy_(on_device, non_blocking=True)
                    on_device.record_stream(self._stream)
                else:
                    host.copy_(on_device)
                st[key] = host

    def lend_in_turn(self, groups: list[list[StateDict]]) -> Iterator[list[StateDict]]:
        """Yield each group of state dicts holding device copies; the homes are back (updated) once the loop ends."""
        fetched = self._fetch(groups[0]) if groups else None
        try:
            for i, group in enumerate(groups):
                current, fetched = fetched, (self._fetch(groups[i + 1]) if i + 1 < len(groups) else None)
                if self.cuda:
                    torch.cuda.current_stream(self.device).wait_stream(self._stream)
                homes = [{k: st[k] for k in copies} for st, copies in zip(group, current)]
                for st, copies in zip(group, current):
                    st.update(copies)
                try:
                    yield group
                finally:
                    self._store(group, homes)
        finally:
            if self.cuda:
                self._stream.synchronize()
