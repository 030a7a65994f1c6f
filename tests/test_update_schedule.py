"""The lr schedule as a stock LambdaLR: warm-up per optimizer step times the decay of the update,
restored from a checkpoint's state with the config's train.lr."""

from __future__ import annotations

import pytest
import torch

from apexcli.config import TrainConfig
from apexcli.train.lr_schedule import UpdateSchedule, lr_factor


def _schedule(**train) -> tuple[UpdateSchedule, torch.optim.Optimizer]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=train.get("lr", 0.1))
    return UpdateSchedule(optimizer, TrainConfig(**train)), optimizer


def test_warm_up_per_optimizer_step_times_the_decay_of_the_update():
    schedule, optimizer = _schedule(lr=0.1, warmup_steps=4, lr_schedule="linear", lr_final=0.5, steps=3)
    assert type(schedule.scheduler) is torch.optim.lr_scheduler.LambdaLR
    schedule.begin_update(1)
    seen = []
    for update in (1, 2, 3):
        schedule.begin_update(update)
        for _ in range(2):  # two optimizer steps per update
            seen.append(schedule.lr)
            assert optimizer.param_groups[0]["lr"] == schedule.lr
            optimizer.step()
            schedule.step()
    expected = [0.1 * min(1.0, (n + 1) / 4) * lr_factor(n // 2 + 1, 3, "linear", 0.5) for n in range(6)]
    assert seen == pytest.approx(expected)


def test_an_update_without_optimizer_steps_does_not_shift_the_decay():
    schedule, _ = _schedule(lr=0.2, lr_schedule="cosine", lr_final=0.1, steps=5)
    for update in (1, 2, 3):  # no optimizer step at all
        schedule.begin_update(update)
    assert schedule.lr == pytest.approx(0.2 * lr_factor(3, 5, "cosine", 0.1))
    assert schedule.scheduler.last_epoch == 0


def test_restore_keeps_the_step_count_and_takes_the_configs_lr():
    saved, saved_optimizer = _schedule(lr=0.1, warmup_steps=10)
    for _ in range(3):
        saved_optimizer.step()
        saved.step()
    state = saved.state_dict()
    assert state["lr_lambdas"] == [None]  # nothing of the lambda is pickled: the config decides it
    resumed, optimizer = _schedule(lr=0.05, warmup_steps=10)
    resumed.load_state_dict(state)
    assert resumed.scheduler.last_epoch == 3
    assert resumed.lr == optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 4 / 10)
