"""Learning-rate schedules: linear warmup, then cosine decay or warmup-stable-decay (WSD)."""

from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, lr: float, warmup_steps: int, schedule: str = "cosine",
          min_lr_ratio: float = 0.1, decay_fraction: float = 0.2) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``total_steps``."""
    min_lr = lr * min_lr_ratio
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "cosine":
        span = max(total_steps - warmup_steps, 1)
        t = min(max(step - warmup_steps, 0) / span, 1.0)
        return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "wsd":
        decay_steps = max(int(round(decay_fraction * total_steps)), 1)
        decay_start = max(total_steps - decay_steps, warmup_steps)
        if step < decay_start:
            return lr
        t = min((step - decay_start) / max(total_steps - decay_start, 1), 1.0)
        return lr - (lr - min_lr) * t
    raise ValueError(f"unknown schedule {schedule!r}")
