"""Linear warmup then cosine decay to a floor; a pure function of the step (trivially resumable)."""

from __future__ import annotations

import math


def learning_rate(step: int, peak: float, floor: float, warmup_steps: int, total_steps: int) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))
