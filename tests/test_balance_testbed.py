"""The synthetic testbed reproduces variance hijacking, and apex avoids it (deterministic, fixed seeds)."""

from __future__ import annotations

import pytest
import torch

from apexcli.balance.testbed import Evaluator, TrainSettings, default_task, hypervolume, train_policy

SEEDS = (0, 1, 2)


def run(strategy: str):
    task = default_task()
    ev = Evaluator(task, samples=2048)
    return [train_policy(task, strategy, seed, TrainSettings(), evaluator=ev) for seed in SEEDS]


def test_evaluator_normalisation():
    task = default_task()
    ev = Evaluator(task, samples=2048)
    assert torch.allclose(ev.normalized(ev.start), torch.zeros(3, dtype=torch.float64))
    assert torch.allclose(ev.normalized(ev.best), torch.ones(3, dtype=torch.float64))
    # boxes 0.5^3 = 0.125 and 0.2 x 1 x 0.1 = 0.02 overlap in 0.2 x 0.5 x 0.1 = 0.01; a point
    # below the reference on one objective adds nothing
    points = torch.tensor([[0.5, 0.5, 0.5], [0.2, 1.0, 0.1], [-0.1, 2.0, 2.0]])
    assert hypervolume(points) == pytest.approx(0.135)
    assert hypervolume(points[2:]) == 0.0


def test_static_is_hijacked_and_apex_improves_every_objective():
    static = run("static")
    apex = run("apex")
    for s, a in zip(static, apex):
        loud, quiet, sparse = s.gains.tolist()
        assert loud > 0.9  # the high-variance reward takes over ...
        assert quiet < 0.0  # ... the low-variance one regresses ...
        assert abs(sparse) < 0.05  # ... and the sparse one never fires
        assert torch.all(a.gains > 0.1), a.gains  # apex improves all three at the end of training
        assert hypervolume(a.points) > 0.05 > 100 * hypervolume(s.points)
    # the mechanism: under static, loud explains almost all of the advantage; under apex it does not
    assert sum(m["balance/share/loud"] for m in static[0].metrics[-20:]) / 20 > 0.95
    assert sum(m["balance/share/loud"] for m in apex[0].metrics[-20:]) / 20 < 0.6


def test_mgda_probe_runs_through_gradient_gram():
    task = default_task()
    result = train_policy(
        task, "mgda", 0, TrainSettings(steps=12), evaluator=Evaluator(task, samples=256), probe_every=5
    )
    assert result.probes == 3  # steps 0, 5, 10
    assert torch.equal(result.weights[0], torch.ones(3))
    assert not torch.equal(result.weights[-1], torch.ones(3))
    assert torch.allclose(result.weights.sum(1), torch.full((12,), 3.0))
