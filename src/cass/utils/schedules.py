"""Learning-rate and momentum schedules as closed-form functions of the global step.

Closed forms (rather than recursive schedulers) make resuming exact and let a resumed run with more
epochs stretch the schedule instead of restarting it.
"""

from __future__ import annotations

import math
from collections.abc import Callable


def cosine(step: int, total_steps: int, start: float, end: float, warmup_steps: int = 0) -> float:
    """Linear warm-up from ``end`` (or 0 when end > start) then half-cosine from ``start`` to ``end``."""
    if step < warmup_steps:
        return start * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


def cosine_lambda(total_steps: int, base: float, end: float, warmup_steps: int = 0) -> Callable[[int], float]:
    """A ``LambdaLR`` factor: the cosine value divided by the base learning rate."""
    return lambda step: cosine(step, total_steps, base, end, warmup_steps) / base


def step_decay_lambda(total_steps: int, milestones: tuple[float, ...] = (0.5, 0.75),
                      factor: float = 0.1, warmup_steps: int = 0) -> Callable[[int], float]:
    """A ``LambdaLR`` factor multiplied by ``factor`` at each milestone (a fraction of ``total_steps``),
    after a linear warm-up from 0 over ``warmup_steps`` (as in :func:`cosine`).

    MedMNIST v2's recipe: x0.1 at epochs 50 and 75 of 100, no warm-up. Fractions rather than epochs keep the
    schedule a closed form of the step, like :func:`cosine_lambda`.
    """
    bounds = [m * total_steps for m in milestones]

    def factor_at(step: int) -> float:
        ramp = (step + 1) / warmup_steps if step < warmup_steps else 1.0
        return ramp * factor ** sum(step >= b for b in bounds)

    return factor_at
