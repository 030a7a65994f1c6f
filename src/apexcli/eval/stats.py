"""Paired statistics over eval prompts for ``apex pareto``. Pure numpy, no I/O.

The held-out eval uses fixed prompts and fixed initial noise (``eval.seed``), so a run's image
for prompt p and the base model's image for p differ only by the LoRA: every comparison is
*paired* by prompt. Notation: x[p, k] a run's score of prompt p on objective k, b[p, k] the
base model's (or another run's), d = x - b. All objectives are maximised.

- gain on k: mean_p d[p, k] over the prompts where both are finite (NaN = not applicable);
  a 95 % CI by the paired percentile bootstrap: resample the prompts with replacement, take
  the mean of d over the resample, and read the 2.5 % and 97.5 % quantiles of those means
  (quantiles by the inverted empirical CDF: no interpolation between replicate values);
- win / tie / loss rate on k: share of those prompts with d > 0 / d == 0 / d < 0 (a tie is
  not a win);
- joint win rate: share of the prompts finite on every objective where d > 0 on **every**
  objective; joint collapse rate: where d < 0 on every objective;
- hypervolume CI: resample the prompts (the same resample for every objective and for the
  base), recompute the run's point(s) as means over the resample, normalise with the fixed
  scale, take the hypervolume above the origin; percentile interval over replicates.

Resamples come from ``bootstrap_indices``: with n prompts and n**n <= n_boot, *every* one of
the n**n ordered resamples, once each (the exact bootstrap distribution; this is what small
test cases compute by hand); otherwise n_boot draws of ``numpy.random.default_rng(seed)``,
so the same (n, n_boot, seed) always gives the same resamples. Every comparison with n
prompts uses the same resamples (common random numbers), so the intervals of two runs and
of their difference are consistent.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from apexcli.eval.pareto import hypervolume
from apexcli.jsonsafe import finite_or_none

DEFAULT_BOOT = 2000
DEFAULT_SEED = 0
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate with a percentile-bootstrap interval (NaN when there is no data)."""

    estimate: float
    low: float
    high: float

    def contains(self, value: float) -> bool:
        return bool(self.low <= value <= self.high)

    def to_json(self) -> dict:
        return {"estimate": _num(self.estimate), "low": _num(self.low), "high": _num(self.high)}


NAN_INTERVAL = Interval(float("nan"), float("nan"), float("nan"))


@dataclass(frozen=True)
class PairedGain:
    """Paired comparison of one objective: run vs reference over the prompts."""

    n: int  # prompts where both scores are finite
    mean: Interval  # mean difference with its CI
    win_rate: float  # share of the n prompts with d > 0
    tie_rate: float  # d == 0
    loss_rate: float  # d < 0

    def to_json(self) -> dict:
        return {
            "n": self.n,
            **{f"mean_{k}": v for k, v in self.mean.to_json().items()},
            "win_rate": _num(self.win_rate),
            "tie_rate": _num(self.tie_rate),
            "loss_rate": _num(self.loss_rate),
        }


@dataclass(frozen=True)
class JointRates:
    n: int  # prompts finite on every objective for both
    win: float  # share with d > 0 on every objective
    collapse: float  # share with d < 0 on every objective

    def to_json(self) -> dict:
        return {"n": self.n, "joint_win": _num(self.win), "joint_collapse": _num(self.collapse)}


def bootstrap_indices(n: int, n_boot: int = DEFAULT_BOOT, seed: int = DEFAULT_SEED) -> np.ndarray:
    """Resamples [B, n] of range(n) (module docstring: exact enumeration when n**n <= n_boot)."""
    if n <= 0:
        return np.zeros((0, 0), dtype=int)
    if n <= 8 and n**n <= n_boot:
        return np.asarray(list(itertools.product(range(n), repeat=n)), dtype=int)
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def percentile_interval(replicates: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """(low, high) quantiles (1 - level)/2 and (1 + level)/2 by the inverted empirical CDF:
    low = the smallest replicate v with share(replicates <= v) >= (1 - level)/2."""
    r = np.asarray(replicates, dtype=float)
    r = r[np.isfinite(r)]
    if r.size == 0:
        return float("nan"), float("nan")
    a = (1.0 - level) / 2.0
    low, high = np.quantile(r, [a, 1.0 - a], method="inverted_cdf")
    return float(low), float(high)


def mean_interval(d: np.ndarray, n_boot: int = DEFAULT_BOOT, seed: int = DEFAULT_SEED) -> Interval:
    """Mean of the finite entries of ``d`` [P] with its percentile-bootstrap CI."""
    d = np.asarray(d, dtype=float).reshape(-1)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return NAN_INTERVAL
    idx = bootstrap_indices(d.size, n_boot, seed)
    low, high = percentile_interval(d[idx].mean(axis=1))
    return Interval(float(d.mean()), low, high)


def paired_gain(run: np.ndarray, ref: np.ndarray, n_boot: int = DEFAULT_BOOT, seed: int = DEFAULT_SEED) -> PairedGain:
    """``run`` [P] vs ``ref`` [P] on one objective, paired by prompt; NaN prompts left out."""
    d = _paired_diff(run, ref)
    d = d[np.isfinite(d)]
    if d.size == 0:
        nan = float("nan")
        return PairedGain(0, NAN_INTERVAL, nan, nan, nan)
    return PairedGain(
        n=int(d.size),
        mean=mean_interval(d, n_boot, seed),
        win_rate=float((d > 0).mean()),
        tie_rate=float((d == 0).mean()),
        loss_rate=float((d < 0).mean()),
    )


def joint_rates(run: np.ndarray, ref: np.ndarray) -> JointRates:
    """Joint win / collapse rates of ``run`` [P, K] vs ``ref`` [P, K] over complete prompts."""
    d = _paired_diff(run, ref)
    if d.ndim == 1:
        d = d[:, None]
    d = d[np.isfinite(d).all(axis=1)]
    if d.shape[0] == 0:
        return JointRates(0, float("nan"), float("nan"))
    return JointRates(int(d.shape[0]), float((d > 0).all(axis=1).mean()), float((d < 0).all(axis=1).mean()))


def hypervolume_interval(
    run_steps: Sequence[np.ndarray],
    ref: np.ndarray,
    scale: np.ndarray,
    n_boot: int = DEFAULT_BOOT,
    seed: int = DEFAULT_SEED,
) -> tuple[Interval, int]:
    """HV of a run's point(s) above the reference's point, with a bootstrap CI over prompts.

    ``run_steps``: one [P, K] score matrix per point of the run (its final eval, or each eval
    step); ``ref`` [P, K] the paired reference scores; ``scale`` [K] the normalisation divisor.
    Only prompts finite everywhere (every step and the reference) are used. Returns the
    interval and that number of prompts.
    """
    (gains,), n = _paired_gains([run_steps], ref, scale)
    if gains is None:
        return NAN_INTERVAL, n
    estimate = _hv_of(gains.mean(axis=1))
    idx = bootstrap_indices(n, n_boot, seed)
    reps = _hv_replicates(gains[:, idx, :].mean(axis=2))
    low, high = percentile_interval(reps)
    return Interval(estimate, low, high), n


def hypervolume_difference(
    a_steps: Sequence[np.ndarray],
    b_steps: Sequence[np.ndarray],
    ref: np.ndarray,
    scale: np.ndarray,
    n_boot: int = DEFAULT_BOOT,
    seed: int = DEFAULT_SEED,
) -> tuple[Interval, int]:
    """HV(a) - HV(b) with a CI: both recomputed on the same prompt resamples (paired)."""
    (ga, gb), n = _paired_gains([a_steps, b_steps], ref, scale)
    if ga is None:
        return NAN_INTERVAL, n
    estimate = _hv_of(ga.mean(axis=1)) - _hv_of(gb.mean(axis=1))
    idx = bootstrap_indices(n, n_boot, seed)
    reps = _hv_replicates(ga[:, idx, :].mean(axis=2)) - _hv_replicates(gb[:, idx, :].mean(axis=2))
    low, high = percentile_interval(reps)
    return Interval(estimate, low, high), n


def _paired_gains(
    runs: Sequence[Sequence[np.ndarray]], ref: np.ndarray, scale: np.ndarray
) -> tuple[list[np.ndarray | None], int]:
    """Per run, its points' gains ``(m - ref) / scale`` as one [S, n, K] array, over the n prompts
    finite in every matrix of every run and in the reference; all None when n is 0 or a run has
    no point."""
    mats = [[np.asarray(m, dtype=float) for m in steps] for steps in runs]
    ref = np.asarray(ref, dtype=float)
    scale = np.asarray(scale, dtype=float).reshape(-1)
    complete = np.isfinite(ref).all(axis=1)
    for m in (m for steps in mats for m in steps):
        complete &= np.isfinite(m).all(axis=1)
    n = int(complete.sum())
    if n == 0 or not all(mats):
        return [None] * len(mats), n
    return [np.stack([(m[complete] - ref[complete]) / scale for m in steps]) for steps in mats], n


def seed_spread(values: np.ndarray) -> tuple[float, float]:
    """(mean, sample std with ddof 1) of per-seed values [S] (std NaN for one seed)."""
    v = np.asarray(values, dtype=float).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan")


def _hv_replicates(boot: np.ndarray) -> np.ndarray:
    """HV of each replicate's points; ``boot`` [S points, B replicates, K]."""
    if boot.shape[0] == 1:  # one point: its box volume when it beats the origin everywhere
        return np.where((boot[0] > 0).all(axis=1), np.clip(boot[0], 0, None).prod(axis=1), 0.0)
    return np.array([_hv_of(boot[:, b, :]) for b in range(boot.shape[1])])


def _hv_of(points: np.ndarray) -> float:
    return hypervolume(np.atleast_2d(points), np.zeros(np.atleast_2d(points).shape[1]))


def _paired_diff(run: np.ndarray, ref: np.ndarray) -> np.ndarray:
    run, ref = np.asarray(run, dtype=float), np.asarray(ref, dtype=float)
    if run.shape != ref.shape:
        raise ValueError(f"paired scores need the same shape, got {run.shape} and {ref.shape}")
    with np.errstate(invalid="ignore"):
        return run - ref  # inf - inf = NaN: left out like a missing score


def _num(x: float) -> float | None:
    """JSON-safe float: NaN/inf become null."""
    return finite_or_none(float(x))
