"""Paired statistics of apex pareto (apexcli.eval.stats, eval.paired) against hand-computed cases."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from rich.console import Console

from apexcli.eval import stats
from apexcli.eval.report import run_pareto

NAN = float("nan")


def test_bootstrap_indices_enumerate_small_n_and_are_seeded_otherwise():
    assert stats.bootstrap_indices(2).tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert stats.bootstrap_indices(3).shape == (27, 3)
    a, b = stats.bootstrap_indices(6, 500, seed=3), stats.bootstrap_indices(6, 500, seed=3)
    assert a.shape == (500, 6) and np.array_equal(a, b)  # 6**6 > 500: drawn, same seed -> same draws
    assert not np.array_equal(a, stats.bootstrap_indices(6, 500, seed=4))


def test_mean_interval_is_the_exact_bootstrap_for_two_and_four_prompts():
    # d = [0, 1]: resample means 0, .5, .5, 1 -> 2.5 % quantile 0, 97.5 % quantile 1
    assert stats.mean_interval(np.array([0.0, 1.0])) == stats.Interval(0.5, 0.0, 1.0)
    # d = [0, 0, 0, 4]: resample mean = number of draws of the 4, Binomial(4, 1/4):
    # P(<=2) = 243/256 < .975 <= P(<=3) = 255/256, so the upper bound is 3 (not the max, 4)
    assert stats.mean_interval(np.array([0.0, 0.0, 0.0, 4.0])) == stats.Interval(1.0, 0.0, 3.0)


def test_paired_gain_ties_and_nan():
    run = np.array([1.0, 2.0, 3.0, 4.0])
    base = np.array([1.0, 1.0, 5.0, NAN])  # d = [0, 1, -2, NaN]: the NaN prompt is left out
    g = stats.paired_gain(run, base)
    assert g.n == 3
    assert (g.win_rate, g.tie_rate, g.loss_rate) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    assert g.mean.estimate == pytest.approx(-1 / 3)
    # d = [1, NaN, 3] -> two prompts, exact bootstrap means 1, 2, 2, 3
    g = stats.paired_gain(np.array([2.0, NAN, 4.0]), np.array([1.0, 0.0, 1.0]))
    assert g.n == 2 and g.win_rate == 1.0
    assert g.mean == stats.Interval(2.0, 1.0, 3.0)
    empty = stats.paired_gain(np.array([NAN]), np.array([1.0]))
    assert empty.n == 0 and np.isnan(empty.mean.estimate)
    # all ties: no win, a zero-width interval at 0
    flat = stats.paired_gain(np.ones(5), np.ones(5))
    assert flat.win_rate == 0.0 and flat.tie_rate == 1.0 and flat.mean == stats.Interval(0.0, 0.0, 0.0)


def test_joint_rates_need_every_objective():
    base = np.zeros((5, 2))
    run = np.array([[1, 1], [1, -1], [-1, -1], [0, 1], [NAN, 1]], dtype=float)
    j = stats.joint_rates(run, base)  # complete prompts 0..3: one joint win, one joint collapse
    assert (j.n, j.win, j.collapse) == (4, 0.25, 0.25)


def test_hypervolume_interval_and_difference_by_hand():
    base = np.zeros((2, 2))
    run = np.array([[2.0, 1.0], [0.0, 3.0]])
    # resamples: (0,0) -> (2,1) HV 2; (0,1),(1,0) -> (1,2) HV 2; (1,1) -> (0,3) HV 0
    hv, n = stats.hypervolume_interval([run], base, np.ones(2))
    assert n == 2 and hv == stats.Interval(2.0, 0.0, 2.0)
    hv, _ = stats.hypervolume_interval([run], base, np.array([2.0, 1.0]))  # first axis halved
    assert hv == stats.Interval(1.0, 0.0, 1.0)
    # two points of one run (its eval steps): the union of their boxes in each resample
    hv, _ = stats.hypervolume_interval([run, np.array([[1.0, 1.0], [1.0, 1.0]])], base, np.ones(2))
    assert hv.estimate == pytest.approx(2.0)  # (1,2) covers (1,1)
    assert hv.low == pytest.approx(1.0)  # resample (1,1): (0,3) adds nothing, (1,1) gives 1
    # other run constant at (1, 1): HV 1 in every resample; differences 1, 1, 1, -1
    other = np.ones((2, 2))
    diff, _ = stats.hypervolume_difference([run], [other], base, np.ones(2))
    assert diff == stats.Interval(1.0, -1.0, 1.0) and diff.contains(0.0)
    # a NaN prompt is left out of the hypervolume bootstrap
    hv, n = stats.hypervolume_interval([np.array([[2.0, 1.0], [NAN, 3.0]])], base, np.ones(2))
    assert n == 1 and hv == stats.Interval(2.0, 2.0, 2.0)


def test_monte_carlo_interval_matches_the_normal_width_for_many_prompts():
    d = np.random.default_rng(1).normal(0.0, 1.0, 400)
    ci = stats.mean_interval(d)
    width = 2 * 1.96 * d.std() / np.sqrt(d.size)
    assert ci.contains(d.mean())
    assert (ci.high - ci.low) == pytest.approx(width, rel=0.15)
    assert stats.mean_interval(d) == ci  # deterministic


def test_seed_spread():
    assert stats.seed_spread(np.array([1.0, 3.0])) == (2.0, pytest.approx(np.sqrt(2.0)))
    m, s = stats.seed_spread(np.array([1.0]))
    assert m == 1.0 and np.isnan(s)


# ------------------------------------------------------------------ apex pareto on run folders
OBJS = ("brightness", "contrast")
BASE = np.array(
    [
        [0.50, 0.40],
        [0.52, 0.41],
        [0.48, 0.39],
        [0.51, 0.42],
        [0.49, 0.38],
        [0.53, 0.40],
        [0.47, 0.41],
        [0.50, 0.39],
        [0.52, 0.40],
        [0.48, 0.42],
    ]
)
WIGGLE = np.array([1, -1] * 5, dtype=float)[:, None] * 1e-3


def write_run(root: Path, folder: str, final: np.ndarray, *, seed=0, lr=1e-3, step=4) -> Path:
    """A run dir with step-0 and step-``step`` evals: metrics rows and per-prompt scores.jsonl."""
    run = root / folder
    run.mkdir(parents=True)
    config = {
        "name": folder,
        "objectives": list(OBJS),
        "seed": seed,
        "train": {"lr": lr},
        "balance": {"strategy": "apex", "weights": None},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    lines = []
    for s, scores in ((0, BASE), (step, final)):
        row = {"step": s, "kind": "eval"}
        for k, name in enumerate(OBJS):
            row[f"eval/{name}/mean"] = float(scores[:, k].mean())
            row[f"eval/{name}/std"] = float(scores[:, k].std())
        lines.append(json.dumps(row))
        d = run / "eval" / f"step-{s:06d}"
        d.mkdir(parents=True)
        d.joinpath("scores.jsonl").write_text(
            "".join(
                json.dumps({"index": i, "prompt": f"p{i}", "seed": 100 + i, **dict(zip(OBJS, map(float, scores[i])))})
                + "\n"
                for i in range(len(scores))
            )
        )
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


def test_pareto_prints_cis_joint_rates_and_says_when_runs_cannot_be_told_apart(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "better", BASE + 0.02, lr=3e-4)  # +0.02 on every prompt and objective
    write_run(root, "noise", BASE + WIGGLE)  # +-0.001 alternating: mean 0
    write_run(root, "noise2", BASE - WIGGLE, seed=1)  # same config as noise, another seed
    console = Console(record=True, width=250)
    res = run_pareto([root], tmp_path / "out", console=console)
    p = res.paired
    better = p.runs["better"]
    assert better.n_prompts == 10
    assert better.gains["brightness"].mean == stats.Interval(
        pytest.approx(0.02), pytest.approx(0.02), pytest.approx(0.02)
    )
    assert better.gains["contrast"].win_rate == 1.0
    assert (better.joint.win, better.joint.collapse) == (1.0, 0.0)
    noise = p.runs["noise"]
    assert noise.gains["brightness"].win_rate == 0.5 and noise.joint.win == 0.5 and noise.joint.collapse == 0.5
    assert noise.gains["brightness"].mean.contains(0.0) and not noise.distinguishable_from_base()
    pairs = {(q.a, q.b): q for q in p.pairs}
    assert pairs[("better", "noise")].distinguishable()
    assert "better beats noise on brightness" in pairs[("better", "noise")].sentence()
    assert not pairs[("noise", "noise2")].distinguishable()
    assert "noise and noise2 cannot be told apart on these 10 prompts" in pairs[("noise", "noise2")].sentence()
    [group] = p.seed_groups
    assert group.runs == ["noise", "noise2"]
    assert group.gains["brightness"][0] == pytest.approx(0.0, abs=1e-12)

    text = console.export_text()
    assert "joint win" in text and "cannot be told apart" in text
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Paired statistics over the eval prompts" in report
    assert "Not distinguishable from the base model (every gain's CI contains 0): noise, noise2" in report
    assert "Spread over seeds" in report
    data = json.loads((tmp_path / "out" / "pareto.json").read_text())
    assert data["paired"]["runs"]["better"]["joint_win"] == 1.0
    assert data["paired"]["runs"]["better"]["gain"]["brightness"]["mean_low"] == pytest.approx(0.02)
    assert any(q["a"] == "noise" and not q["distinguishable"] for q in data["paired"]["pairs"])


def test_runs_without_scores_files_get_a_warning_not_an_error(tmp_path):
    root = tmp_path / "runs"
    run = write_run(root, "a", BASE + 0.01)
    (run / "eval" / "step-000004" / "scores.jsonl").unlink()
    res = run_pareto([root], tmp_path / "out", console=Console(file=open("/dev/null", "w")))
    assert res.paired.runs == {}
    assert "no scores.jsonl for eval step(s) 4" in res.paired.warnings[0]
