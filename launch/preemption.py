"""Preemption: SIGTERM (SLURM's preemption and time-limit signal, ``scancel``, torchrun forwarding its own) and
SIGINT (Ctrl-C) ask for a checkpoint at the end of the current step and a clean exit (code 0), so the next
submission resumes with nothing lost.

The first signal only sets a flag and gives the signals their default action back, so a second one ends the
process at once, mid-step, without saving (Ctrl-C twice), except a SIGTERM within ``duplicate_window_s`` (5 s)
of a first SIGTERM: on preemption or ``scancel`` Slurm signals every process of the job, and torchrun forwards
its own copy, so each worker gets two at once (measured on a real Slurm: the second one used to abort the save).
Every rank must stop after the same step, even when the signal reached only some of them, or reached them at
different moments: the flags are MAX-all-reduced. ``stop_requested_async()``, called once per step, starts that
all-reduce on a CPU (gloo) group of its own and returns the result of the one started the step before: no device
synchronisation and no waiting, at the price of stopping one step later. ``stop_requested()`` is the blocking
form (used once after the last step).

torchrun starts its workers in their own sessions: Ctrl-C in the terminal reaches torchrun, which forwards the
signal once and waits ``--shutdown-timeout`` seconds (default 30) before SIGKILL; the save must fit in it.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionHandler:
    duplicate_window_s = 5.0  # a SIGTERM this soon after the first is the same request (Slurm + torchrun)

    def __init__(self) -> None:
        self.received: int | None = None  # the first signal's number
        self._received_at = 0.0
        self._previous: dict[int, Any] = {}
        self._group: Any = None  # gloo group for the flags (created on first use: a collective on every rank)
        self._in_flight: tuple[Any, torch.Tensor] | None = None

    def install(self) -> "PreemptionHandler":
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.received is None:
            self.received, self._received_at = signum, time.monotonic()
            # from now on a signal's default action ends the process at once, at the OS level (even while the
            # main thread is inside a collective); a first SIGTERM keeps SIGTERM here for the duplicate window
            for sig in SIGNALS:
                if not (sig == signum == signal.SIGTERM):
                    signal.signal(sig, signal.SIG_DFL)
            return
        if time.monotonic() - self._received_at < self.duplicate_window_s:
            return  # SIGTERM again, within the window: the same request delivered twice
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def _close_duplicate_window(self) -> None:
        """Once the window has passed, SIGTERM too ends the process at the OS level (main thread, per step)."""
        if self.received == signal.SIGTERM and self._previous and \
                time.monotonic() - self._received_at >= self.duplicate_window_s:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    def stop_requested(self) -> bool:
        """Collective when distributed: True on every rank if any rank got a signal (blocking)."""
        self._close_duplicate_window()
        if not _distributed():
            return self.received is not None
        if self._in_flight is not None:  # complete the asynchronous round first: collectives stay in order
            stop = self._finish()
            if stop:
                return True
        work, flag = self._start()
        work.wait()
        return bool(flag.item())

    def stop_requested_async(self) -> bool:
        """Collective when distributed: whether any rank had a signal when the previous call started its
        all-reduce (the same answer on every rank); starts the next one. One step late, never blocking."""
        self._close_duplicate_window()
        if not _distributed():
            return self.received is not None
        stop = self._finish() if self._in_flight is not None else False
        self._in_flight = self._start()
        return stop

    def _start(self) -> tuple[Any, torch.Tensor]:
        if self._group is None:
            self._group = dist.new_group(backend="gloo")
        flag = torch.tensor([1.0 if self.received is not None else 0.0])  # CPU: reading it is no device sync
        return dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flag

    def _finish(self) -> bool:
        work, flag = self._in_flight
        self._in_flight = None
        work.wait()
        return bool(flag.item())


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
