"""apex's progress probe: p_k read off fixed training prompts and noise, so it follows the policy.

The batch means it replaces follow which prompts each step drew. With a learning rate too small
to change a float32 output, the policy is the base at every step: the probe must then read
progress exactly 0, where the batch means read the prompt draw as progress.
"""

from __future__ import annotations

from helpers import read_metrics, train_tiny

STILL_POLICY = (
    "--objectives",
    "brightness,colorfulness",
    "train.lr=1e-30",
    "balance.probe_every=2",
    "balance.apex.warmup=0",
)


def _progress(run) -> list[tuple[float, float]]:
    return [(r["balance/progress/brightness"], r["balance/progress/colorfulness"]) for r in read_metrics(run)]


def test_probe_reads_no_progress_from_an_unchanged_policy(tmp_path):
    probed = train_tiny(tmp_path / "probe", 5, *STILL_POLICY, "balance.experimental.progress_prompts=3")
    rows = read_metrics(probed)
    assert [r["time/progress_probe"] > 0 for r in rows] == [True, False, True, False, True]  # every probe_every steps
    assert _progress(probed) == [(0.0, 0.0)] * 5
    batches = train_tiny(tmp_path / "batches", 5, *STILL_POLICY)
    assert any(abs(p) > 1e-3 for row in _progress(batches) for p in row)  # the prompt draw, read as progress


def test_probe_reads_the_progress_of_a_moving_policy(tmp_path):
    run = train_tiny(
        tmp_path / "run",
        3,
        "--objectives",
        "brightness,colorfulness",
        "train.lr=3e-2",
        "balance.probe_every=2",
        "balance.experimental.progress_prompts=3",
        "balance.apex.warmup=0",
    )
    first, _, third = _progress(run)
    assert first == (0.0, 0.0)  # the first reading is the base
    assert third != (0.0, 0.0)  # two updates later the same prompts and noise score differently
