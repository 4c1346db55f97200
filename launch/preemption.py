"""Preemption: SIGTERM (SLURM's preemption and time-limit signal, ``scancel``, torchrun forwarding its own) and
SIGINT (Ctrl-C) ask for a checkpoint at the end of the current step and a clean exit (code 0), so the next
submission resumes with nothing lost.

The first signal only sets a flag (and restores the default action, so a second signal ends the process at
once, mid-step, without saving). The trainer asks ``stop_requested()`` once per step: one MAX all-reduce over
all ranks, so every rank stops after the same step even when the signal reached only some of them, or reached
them at different moments.

torchrun starts its workers in their own sessions: Ctrl-C in the terminal reaches torchrun, which forwards the
signal once and waits ``--shutdown-timeout`` seconds (default 30) before SIGKILL; the save must fit in it.
"""
from __future__ import annotations

import signal
import threading
from typing import Any

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionHandler:
    def __init__(self) -> None:
        self.received: int | None = None  # the first signal's number
        self._previous: dict[int, Any] = {}

    def install(self) -> "PreemptionHandler":
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.received is None:
            self.received = signum
        for sig in SIGNALS:  # a second signal: the default action, i.e. end now
            signal.signal(sig, signal.SIG_DFL)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    def stop_requested(self, device: torch.device) -> bool:
        """Collective when distributed: True on every rank if any rank got a signal."""
        local = self.received is not None
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return local
        flag = torch.tensor([1.0 if local else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
