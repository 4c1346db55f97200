"""Learning-rate schedule as a pure function of the step: linear warmup, then cosine, WSD or constant.

``lr_factor(step, ...)`` is the multiplier of the base lr used by the optimizer step with 0-based index
``step`` (of ``total_steps``):

- warmup (``step < warmup_steps``): (step + 1) / warmup_steps, so the first step already moves;
- "constant": 1 after warmup;
- "cosine": from 1 right after warmup to ``min_lr_ratio`` at the last step (half cosine);
- "wsd" (warmup-stable-decay): 1 until the last ``wsd_decay_fraction * total_steps`` steps, then linear to
  ``min_lr_ratio`` at the last step.
"""
from __future__ import annotations

import math


def lr_factor(step: int, total_steps: int, warmup_steps: int = 0, decay: str = "cosine",
              min_lr_ratio: float = 0.0, wsd_decay_fraction: float = 0.2) -> float:
    if not 0 <= step < total_steps:
        raise ValueError(f"lr schedule: step {step} outside [0, total_steps={total_steps})")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    if decay == "cosine":
        span = total_steps - 1 - warmup_steps
        progress = (step - warmup_steps) / span if span > 0 else 1.0
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if decay == "wsd":
        decay_steps = max(1, round(wsd_decay_fraction * total_steps))
        decay_start = max(warmup_steps, total_steps - decay_steps)
        if step < decay_start:
            return 1.0
        span = total_steps - 1 - decay_start
        progress = (step - decay_start + 1) / (span + 1) if span >= 0 else 1.0
        return 1.0 - (1.0 - min_lr_ratio) * progress
    raise ValueError(f"lr schedule: unknown decay {decay!r} (use 'cosine', 'wsd' or 'constant')")


def lr_at(step: int, base_lr: float, total_steps: int, warmup_steps: int = 0, decay: str = "cosine",
          min_lr_ratio: float = 0.0, wsd_decay_fraction: float = 0.2) -> float:
    """Learning rate of 0-based optimizer step ``step``: ``base_lr * lr_factor(...)``."""
    return base_lr * lr_factor(step, total_steps, warmup_steps, decay, min_lr_ratio, wsd_decay_fraction)


def schedule_fn(schedule_cfg, total_steps: int):
    """``factor(step)`` bound to a ``configs.ScheduleConfig``."""
    c = schedule_cfg

    def factor(step: int) -> float:
        return lr_factor(step, total_steps, c.warmup_steps, c.decay, c.min_lr_ratio, c.wsd_decay_fraction)

    return factor
