"""Steps the optimizer skipped because their global gradient norm was not finite (muonclip/skip_nonfinite.py): counted,
logged (``skipped_steps``, cumulative), alerted, and after ``monitor.max_skipped_steps`` of them in a row the end
of the run.

The optimizer decides on the device, so the loop learns which steps were skipped where it already reads the
pending losses on the host (``Trainer._judge``: log, eval, checkpoint and stop steps), in the same transfer. Each
skip is therefore alerted at most ``train.log_interval`` steps late, and a run that skips every step stops within
``train.log_interval`` steps of reaching the limit (with ``log_interval: 1``, at the limit). Every rank reads the same
flags (the norm is global) and stops alike: ``FloatingPointError``, a runtime failure (exit code 1, launch/errors.py).
"""
from __future__ import annotations

import math
from typing import Any, Callable

Alert = Callable[[str, str, str], Any]  # (title, text, level)


class SkippedSteps:
    """``record(step, skipped, grad_norm)`` per step in order; ``total`` and ``in_row`` count the skips."""

    def __init__(self, max_in_row: int, alert: Alert):
        if max_in_row < 1:
            raise ValueError(f"max_in_row must be >= 1, got {max_in_row}")
        self.max_in_row, self.alert = max_in_row, alert
        self.total = 0  # skipped steps in the whole run (carried by checkpoints)
        self.in_row = 0  # skipped steps since the last applied one

    def record(self, step: int, skipped: bool, grad_norm: float) -> None:
        """Count step ``step`` (completed steps, as logged); raise once ``max_in_row`` steps in a row were skipped."""
        if not skipped:
            self.in_row = 0
            return
        self.total += 1
        self.in_row += 1
        first = step - self.in_row + 1
        if self.in_row >= self.max_in_row:
            text = (f"{self.in_row} steps in a row skipped (steps {first}-{step}): their global gradient norm was not "
                    f"finite (monitor.max_skipped_steps={self.max_in_row}); the weights are those before step {first}: "
                    "lower optim.lr, look at the data of those steps, or resume from an earlier checkpoint")
            self.alert("skipped steps: stopped", text, "ERROR")
            raise FloatingPointError(text)
        norm = "NaN" if math.isnan(grad_norm) else f"{grad_norm}"
        self.alert("skipped step", f"step {step}: global gradient norm {norm}; the update was skipped on every rank "
                   f"(weights and optimizer state unchanged; {self.in_row} in a row, {self.total} in all)", "WARN")

    def metrics(self) -> dict[str, float]:
        return {"skipped_steps": self.total}

    def state_dict(self) -> dict[str, int]:
        return {"total": self.total, "in_row": self.in_row}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.total, self.in_row = int(state["total"]), int(state["in_row"])
