"""train.lr_schedule: the decay factor by hand, the lr each update trains with, and a resume
after a crash that continues the schedule bit for bit."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from apexcli.train.lr_schedule import lr_factor
from helpers import load_lora_file, read_metrics, train_tiny


def test_factor_by_hand():
    assert [lr_factor(u, 5, "constant", 0.1) for u in range(1, 6)] == [1.0] * 5
    assert [lr_factor(u, 5, "linear", 0.1) for u in range(1, 6)] == pytest.approx([1.0, 0.775, 0.55, 0.325, 0.1])
    # half a cosine: 1 at the first update, final at the last, their mean half-way
    cosine = [lr_factor(u, 5, "cosine", 0.1) for u in range(1, 6)]
    assert cosine == pytest.approx(
        [1.0, 0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2, 0.55, 0.1 + 0.9 * (1 - math.cos(math.pi / 4)) / 2, 0.1]
    )
    assert lr_factor(1, 1, "cosine", 0.0) == 1.0  # one update: no decay to do
    assert lr_factor(9, 5, "linear", 0.2) == pytest.approx(0.2)  # past the end: held at final
    with pytest.raises(ValueError, match="cosine"):
        lr_factor(1, 5, "exponential", 0.1)


def test_bad_schedule_is_a_config_error(tmp_path):
    from helpers import run_cli

    result = run_cli(
        ["train", "--preset", "tiny", "--steps", "1", "--out", str(tmp_path / "run"), "train.lr_schedule=step"]
    )
    assert result.code != 0
    assert "train.lr_schedule" in result.stderr and "cosine" in result.stderr


SCHEDULED = (
    "--objectives",
    "brightness,colorfulness",
    "train.lr=0.02",
    "train.lr_schedule=cosine",
    "train.lr_final=0.25",
    "train.checkpoint_every=2",
    "train.keep_checkpoints=0",
)


@pytest.fixture(scope="module")
def scheduled_run(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("lr") / "run", 4, *SCHEDULED)


def test_each_update_trains_at_its_scheduled_lr(scheduled_run):
    rows = read_metrics(scheduled_run)
    assert [r["lr"] for r in rows] == pytest.approx([0.02 * lr_factor(u, 4, "cosine", 0.25) for u in (1, 2, 3, 4)])
    assert rows[-1]["lr"] == pytest.approx(0.005)


def test_resume_after_a_crash_continues_the_schedule(scheduled_run, tmp_path):
    """A crash after the step-2 checkpoint (the later one lost), then --resume auto: the same
    LoRA as the run that never stopped, so the schedule restarts where it was, not at the top."""
    crashed = tmp_path / "crashed"
    shutil.copytree(scheduled_run, crashed)
    shutil.rmtree(crashed / "checkpoints" / "step-000004")
    train_tiny(crashed, 4, *SCHEDULED, resume="auto")
    assert [r["lr"] for r in read_metrics(crashed)] == [r["lr"] for r in read_metrics(scheduled_run)]
    a = load_lora_file(scheduled_run / "checkpoints" / "step-000004")
    b = load_lora_file(crashed / "checkpoints" / "step-000004")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
