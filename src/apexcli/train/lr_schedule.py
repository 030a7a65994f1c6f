"""Learning-rate decay over a run's training updates, applied through a stock ``LambdaLR``.

The decay is indexed by training update, not optimizer step: an update whose advantages are all
zero makes no optimizer step, and a schedule over optimizer steps would then end late by a
number of steps that depends on the rewards. Warm-up (``train.warmup_steps``) stays per
optimizer step and multiplies this factor.
"""

from __future__ import annotations

import math

import torch

from apexcli.config import LR_SCHEDULES as SCHEDULES
from apexcli.config import TrainConfig


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


class UpdateSchedule:
    """``train.lr`` x warm-up(optimizer step) x decay(training update), as one ``LambdaLR``.

    The lambda reads the current update's decay, so the scheduler's state (its step count and
    base lr) is all a checkpoint needs; ``begin_update`` sets the decay and re-applies the
    scheduler's formula, since the first optimizer step of an update must not use the lr
    computed under the previous update's decay.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, train: TrainConfig):
        self._train = train
        self._decay = 1.0
        warmup = max(train.warmup_steps, 0)

        def factor(optimizer_step: int) -> float:  # a plain function: the scheduler's state_dict keeps nothing of it
            return (min(1.0, (optimizer_step + 1) / warmup) if warmup else 1.0) * self._decay

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    @property
    def lr(self) -> float:
        """The lr of the next optimizer step."""
        return self.scheduler.optimizer.param_groups[0]["lr"]

    def begin_update(self, update: int) -> None:
        t = self._train
        self._decay = lr_factor(update, t.steps, t.lr_schedule, t.lr_final)
        self._apply()

    def step(self) -> None:
        """After each optimizer step: the next step's warm-up."""
        self.scheduler.step()

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """The checkpoint's step count with the config's ``train.lr`` (what config.yaml records)."""
        self.scheduler.load_state_dict({**state, "base_lrs": [self._train.lr] * len(self.scheduler.base_lrs)})
        self._apply()

    def _apply(self) -> None:
        s = self.scheduler
        for group, base, fn in zip(s.optimizer.param_groups, s.base_lrs, s.lr_lambdas):
            group["lr"] = base * fn(s.last_epoch)
