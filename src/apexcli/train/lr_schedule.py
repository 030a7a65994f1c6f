"""Learning-rate decay over a run's training updates (pure math; the trainer applies it).

The decay is indexed by training update, not optimizer step: an update whose advantages are all
zero makes no optimizer step, and a schedule over optimizer steps would then end late by a
number of steps that depends on the rewards. Warm-up (``train.warmup_steps``) stays per
optimizer step and multiplies this factor.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine", "linear")


def lr_factor(update: int, total: int, schedule: str, final: float) -> float:
    """Multiplier of ``train.lr`` during training update ``update`` (1-based) of ``total``.

    constant: 1. cosine and linear: 1 at the first update, ``final`` at the last (half-cosine or
    straight line between; a run of one update stays at 1). Updates past ``total`` (a resumed run
    given more steps is rescheduled over its new total instead) are held at ``final``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    if schedule == "constant" or total <= 1:
        return 1.0
    progress = min(max((update - 1) / (total - 1), 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - (1.0 - final) * progress
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
