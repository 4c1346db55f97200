"""Hung or dead ranks: heartbeats through the process group's key-value store, so a stuck job ends with a line
naming the silent rank(s) within ``train.dist_timeout_s`` instead of blocking in a collective for 30 minutes.

Every rank's heartbeat thread writes ``watchdog/<rank> = "<beat> <progress> <step>"`` every ``interval``
seconds (a tenth of the timeout, 0.5-10 s); ``beat`` counts the thread's ticks (alive), ``progress`` the
training loop's (``Watchdog.progress()``: every micro batch, under PP every pipeline action, optimizer step and
eval batch). Rank 0 reads everyone's, rank 1 reads rank 0's (each rank's store traffic stays O(1); rank 0's
is O(world)). Changes are timed on the reader's own monotonic clock, so clocks across nodes need not agree.

- **silent**: a rank whose beat has not changed for the timeout (SIGSTOP'd, killed, its node lost, or its store
  unreachable): ``rank(s) 3 silent for 612 s (no heartbeat; stopped, dead or unreachable)``.
- **stuck** (once ``arm()`` was called at the start of the loop): nobody's progress has changed for the timeout while every heartbeat is alive (a deadlock, or a
  collective some rank never joins): the ranks behind the others are named, or all ranks when they are level.
  Phases that legitimately take long (checkpoint save) run under ``with watchdog.busy():``.

On either, the detecting rank prints ``error [rank r]: ...``, calls ``on_fail`` (a W&B alert on
rank 0) and exits with code 1; torchrun then stops the other workers and, with ``--max-restarts``, starts a new
attempt that resumes from the latest checkpoint (``train.resume: auto``). The process groups get
``timeout + PG_GRACE_S`` as their own timeout, as a backstop that fires after the watchdog.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

PG_GRACE_S = 30.0
PREFIX = "watchdog/"


def heartbeat_interval(timeout_s: float) -> float:
    return min(10.0, max(0.5, timeout_s / 10))


class Watchdog:
    def __init__(self, store: Any, rank: int, world: int, timeout_s: float,
                 on_fail: Callable[[str], None] | None = None):
        self.store, self.rank, self.world, self.timeout_s = store, rank, world, timeout_s
        self.interval = heartbeat_interval(timeout_s)
        self.on_fail = on_fail
        self._beat = 0
        self._progress = 0
        self._step = 0
        self._busy = 1  # until arm(): building data and model may take long, only liveness is checked
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        self.watched = list(range(1, world)) if rank == 0 else ([0] if rank == 1 else [])
        self._seen: dict[int, tuple[str, float]] = {}  # rank -> (last beat value, when it changed)
        self._progress_seen: dict[int, tuple[int, float]] = {}

    # ---------------------------------------------------------------- main thread
    def start(self) -> "Watchdog":
        self._publish()
        self._thread.start()
        return self

    def arm(self) -> None:
        """The training loop starts: from now on a lack of progress counts too."""
        self._busy -= 1
        self.progress()

    def progress(self, step: int | None = None) -> None:
        self._progress += 1
        if step is not None:
            self._step = step

    @contextmanager
    def busy(self) -> Iterator[None]:
        """A phase that may last longer than the timeout without progress (liveness is still checked)."""
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1
            self.progress()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self.interval + 1)

    # ---------------------------------------------------------------- heartbeat thread
    def _publish(self) -> None:
        self._beat += 1
        busy = 1 if self._busy else 0
        self.store.set(f"{PREFIX}{self.rank}", f"{self._beat} {self._progress} {self._step} {busy}")

    def _run(self) -> None:
        started = time.monotonic()
        for r in self.watched + [self.rank]:
            self._seen[r] = ("", started)
            self._progress_seen[r] = (-1, started)
        while not self._stop.wait(self.interval):
            try:
                self._publish()
                message = self._check(time.monotonic())
            except Exception as e:  # noqa: BLE001 - the store itself is gone (its host died)
                message = (f"the rendezvous store is unreachable ({type(e).__name__}: {e}); rank 0 or the torchrun "
                           "agent hosting it has died")
            if message is not None and not self._stop.is_set():
                self._fail(message)

    def _read(self, r: int) -> tuple[str, int, int, bool]:
        value = self.store.get(f"{PREFIX}{r}").decode()
        beat, progress, step, busy = value.split()
        return beat, int(progress), int(step), busy == "1"

    def _check(self, now: float) -> str | None:
        states = {r: self._read(r) for r in self.watched}
        states[self.rank] = (str(self._beat), self._progress, self._step, bool(self._busy))
        for r, (beat, progress, _, _) in states.items():
            if beat != self._seen[r][0]:
                self._seen[r] = (beat, now)
            if progress != self._progress_seen[r][0]:
                self._progress_seen[r] = (progress, now)
        silent = sorted(r for r in self.watched if now - self._seen[r][1] > self.timeout_s)
        if silent:
            quiet_for = max(now - self._seen[r][1] for r in silent)
            steps = ", ".join(f"rank {r} after step {states[r][2]}" for r in silent)
            return (f"rank(s) {', '.join(map(str, silent))} silent for {quiet_for:.0f} s (no heartbeat: stopped, dead "
                    f"or unreachable; last seen {steps}); ending the job (train.dist_timeout_s={self.timeout_s:g})")
        if self.rank != 0 or any(busy for *_, busy in states.values()):
            return None
        last_change = max(when for _, when in self._progress_seen.values())
        if now - last_change <= self.timeout_s:
            return None
        ahead = max(progress for _, progress, _, _ in states.values())
        behind = sorted(r for r, (_, progress, _, _) in states.items() if progress < ahead)
        where = ", ".join(f"rank {r} at step {states[r][2]}" for r in (behind or sorted(states)))
        who = (f"rank(s) {', '.join(map(str, behind))} stuck (alive but no progress; {where})" if behind else
               f"all ranks stuck at the same point ({where}): a deadlock or a collective some rank never joined")
        return f"{who} for {now - last_change:.0f} s; ending the job (train.dist_timeout_s={self.timeout_s:g})"

    def _fail(self, message: str) -> None:
        from launch.errors import rank_prefix

        if self.on_fail is not None:
            try:
                self.on_fail(message)
            except Exception:  # noqa: BLE001 - the alert is best effort; ending the job is not
                pass
        print(f"error{rank_prefix()}: {message}", file=sys.stderr, flush=True)
        os._exit(1)
