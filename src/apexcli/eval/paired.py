"""Paired, per-prompt comparisons for ``apex pareto``: read scores.jsonl, call ``eval.stats``.

For each compared run: its eval scores per prompt at the compared step(s)
(``eval/step-XXXXXX/scores.jsonl``) and the base model's (its own step-0 eval; another run's
when it has none), matched by (index, prompt, seed). From them (formulas in ``eval.stats``):
per-objective gain over the base with a bootstrap CI and win rate, joint win / collapse
rates, a CI of the run's hypervolume; per pair of runs, the CI of each objective's paired
difference and of the hypervolume difference, and a sentence saying whether they can be told
apart; per group of runs that differ only in ``seed``, the spread over seeds.
A run whose scores files are missing gets no paired statistics, with a warning, never an error.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from apexcli.config_upgrade import upgrade_config
from apexcli.eval import stats
from apexcli.eval.collect import PointTable
from apexcli.runs import SOUP_FILE, RunDir

SCORES_FILE = "scores.jsonl"
# config keys that do not change what a run is (it is the "same config" without them)
NOT_CONFIG = ("seed", "name", "out", "logging")


@dataclass
class RunStats:
    name: str
    n_prompts: int  # prompts paired with the base (all of them, before NaN filtering)
    base_source: str  # where the paired base scores come from
    gains: dict[str, stats.PairedGain]  # objective -> paired gain over the base
    joint: stats.JointRates
    hypervolume: stats.Interval
    hv_prompts: int  # prompts finite everywhere (the HV bootstrap's)

    def distinguishable_from_base(self) -> bool:
        return any(g.n > 0 and not g.mean.contains(0.0) for g in self.gains.values())

    def to_json(self) -> dict:
        return {
            "n_prompts": self.n_prompts,
            "base_scores": self.base_source,
            "gain": {k: g.to_json() for k, g in self.gains.items()},
            **self.joint.to_json(),
            "hypervolume_ci": self.hypervolume.to_json(),
            "hypervolume_prompts": self.hv_prompts,
            "differs_from_base": self.distinguishable_from_base(),
        }


@dataclass
class PairStats:
    a: str
    b: str
    n: int  # prompts paired
    diffs: dict[str, stats.Interval]  # objective -> mean of a - b with CI
    hypervolume: stats.Interval  # HV(a) - HV(b)

    def distinguishable(self) -> bool:
        parts = list(self.diffs.values()) + [self.hypervolume]
        return any(np.isfinite(i.low) and not i.contains(0.0) for i in parts)

    def sentence(self) -> str:
        if self.n == 0:
            return f"{self.a} vs {self.b}: no prompts in common, no paired comparison."
        if not self.distinguishable():
            return (
                f"{self.a} and {self.b} cannot be told apart on these {self.n} prompts: the 95 % CI "
                "of every paired difference (each objective and the hypervolume) contains 0."
            )
        found, tied = [], False
        for k, i in self.diffs.items():
            if np.isfinite(i.low) and not i.contains(0.0):
                better, worse = (self.a, self.b) if i.estimate > 0 else (self.b, self.a)
                shown = i if i.estimate > 0 else stats.Interval(-i.estimate, -i.high, -i.low)
                found.append(f"{better} beats {worse} on {k} (by {_ci(shown)})")
            else:
                tied = True
        if np.isfinite(self.hypervolume.low) and not self.hypervolume.contains(0.0):
            found.append(f"hypervolume {self.a} - {self.b} = {_ci(self.hypervolume)}")
        else:
            tied = True
        rest = "; the other differences' CIs contain 0" if tied else ""
        return f"{self.a} vs {self.b} ({self.n} prompts, 95 % CIs): " + "; ".join(found) + rest + "."

    def to_json(self) -> dict:
        return {
            "a": self.a,
            "b": self.b,
            "n": self.n,
            "difference": {k: i.to_json() for k, i in self.diffs.items()},
            "hypervolume_difference": self.hypervolume.to_json(),
            "distinguishable": self.distinguishable(),
            "sentence": self.sentence(),
        }


@dataclass
class SeedGroup:
    runs: list[str]
    gains: dict[str, tuple[float, float]]  # objective -> (mean, std) of the normalised gain
    hypervolume: tuple[float, float]

    def to_json(self) -> dict:
        return {
            "runs": self.runs,
            "gain": {k: {"mean": stats._num(m), "std": stats._num(s)} for k, (m, s) in self.gains.items()},
            "hypervolume": {"mean": stats._num(self.hypervolume[0]), "std": stats._num(self.hypervolume[1])},
        }


@dataclass
class PairedReport:
    runs: dict[str, RunStats] = field(default_factory=dict)  # run name -> stats (runs with scores)
    pairs: list[PairStats] = field(default_factory=list)
    seed_groups: list[SeedGroup] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    n_boot: int = stats.DEFAULT_BOOT

    def to_json(self) -> dict:
        return {
            "method": "paired percentile bootstrap over eval prompts (95 %), "
            f"{self.n_boot} resamples or all n^n when fewer; see apexcli.eval.stats",
            "runs": {k: v.to_json() for k, v in self.runs.items()},
            "pairs": [p.to_json() for p in self.pairs],
            "seed_groups": [g.to_json() for g in self.seed_groups],
            "warnings": self.warnings,
        }


Scores = dict[tuple, dict[str, float]]


def read_scores(run_path: Path, step: int) -> Scores | None:
    """(index, prompt, seed) -> {objective: score (NaN for null)} of one eval; None if absent."""
    path = RunDir(Path(run_path)).eval_dir(step) / SCORES_FILE
    if not path.is_file():
        return None
    out: Scores = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(row, dict):
                continue
            key = (row.get("index"), row.get("prompt"), row.get("seed"))
            out[key] = {k: _as_float(v) for k, v in row.items() if k not in ("index", "prompt", "seed")}
    return out


def matrix(scores: Scores, keys: list[tuple], objectives: list[str]) -> np.ndarray:
    """[P, K] in ``keys`` order; a missing objective is NaN."""
    return np.array([[scores[key].get(k, math.nan) for k in objectives] for key in keys], dtype=float)


def analyse(
    table: PointTable,
    scale: np.ndarray,
    run_hypervolume: list[float],
    normalised: np.ndarray,
    *,
    n_boot: int = stats.DEFAULT_BOOT,
    seed: int = stats.DEFAULT_SEED,
) -> PairedReport:
    """Paired statistics of every run of ``table`` (module docstring). ``scale`` [K] is the
    pareto normalisation's divisor, so hypervolume CIs are in the table's units."""
    report = PairedReport(n_boot=n_boot)
    objs = table.objectives
    shared_base: tuple[str, Scores] | None = None
    bases: dict[int, Scores | None] = {}
    for r, run in enumerate(table.runs):
        bases[r] = read_scores(run.path, 0)
        if bases[r] is not None and shared_base is None:
            shared_base = (run.name, bases[r])

    per_run: dict[int, tuple[list[tuple], np.ndarray, list[np.ndarray]]] = {}
    for r, run in enumerate(table.runs):
        steps = [int(s) for s in table.steps[table.run_index == r]]
        step_scores = [read_scores(run.path, s) for s in steps]
        missing = [s for s, sc in zip(steps, step_scores) if sc is None]
        if missing:
            report.warnings.append(
                f"{run.name}: no {SCORES_FILE} for eval step(s) {','.join(map(str, missing))}; "
                "no paired statistics for this run"
            )
            continue
        base = bases[r]
        source = "its own step-0 eval"
        if base is None:
            if shared_base is None:
                report.warnings.append(f"{run.name}: no step-0 {SCORES_FILE} in any run; no paired statistics")
                continue
            source = f"the step-0 eval of {shared_base[0]} (this run has none)"
            base = shared_base[1]
        keys = [key for key in base if all(key in sc for sc in step_scores)]
        if not keys:
            report.warnings.append(f"{run.name}: its eval prompts match none of the base eval's; no paired statistics")
            continue
        if len(keys) < len(base):
            report.warnings.append(
                f"{run.name}: {len(base) - len(keys)} base eval prompt(s) have no score in the run; left out"
            )
        b = matrix(base, keys, objs)
        mats = [matrix(sc, keys, objs) for sc in step_scores]
        final = mats[-1]
        hv, hv_n = stats.hypervolume_interval(mats, b, scale, n_boot, seed)
        report.runs[run.name] = RunStats(
            name=run.name,
            n_prompts=len(keys),
            base_source=source,
            gains={k: stats.paired_gain(final[:, i], b[:, i], n_boot, seed) for i, k in enumerate(objs)},
            joint=stats.joint_rates(final, b),
            hypervolume=hv,
            hv_prompts=hv_n,
        )
        per_run[r] = (keys, b, mats)

    ids = sorted(per_run)
    for x, i in enumerate(ids):
        for j in ids[x + 1 :]:
            report.pairs.append(_pair(table, per_run[i], per_run[j], i, j, scale, n_boot, seed))
    report.seed_groups = _seed_groups(table, normalised, run_hypervolume)
    return report


def _pair(table, pi, pj, i, j, scale, n_boot, seed) -> PairStats:
    keys_i, base_i, mats_i = pi
    keys_j, _, mats_j = pj
    pos_j = {key: n for n, key in enumerate(keys_j)}
    common = [n for n, key in enumerate(keys_i) if key in pos_j]
    other = [pos_j[keys_i[n]] for n in common]
    a_steps = [m[common] for m in mats_i]
    b_steps = [m[other] for m in mats_j]
    diffs = {
        k: stats.mean_interval(a_steps[-1][:, c] - b_steps[-1][:, c], n_boot, seed)
        for c, k in enumerate(table.objectives)
    }
    hv, _ = stats.hypervolume_difference(a_steps, b_steps, base_i[common], scale, n_boot, seed)
    return PairStats(table.runs[i].name, table.runs[j].name, len(common), diffs, hv)


def _seed_groups(table: PointTable, normalised: np.ndarray, run_hv: list[float]) -> list[SeedGroup]:
    """Runs whose configs are equal once ``NOT_CONFIG`` keys are removed, and differ in seed."""
    groups: dict[str, list[int]] = {}
    seeds: dict[int, object] = {}
    for r, run in enumerate(table.runs):
        try:
            config, _ = upgrade_config(RunDir(run.path).read_config())  # runs from before keys moved group with today's
        except Exception:  # unreadable configs were reported by collect
            continue
        seeds[r] = config.get("seed")
        soup = run.path / SOUP_FILE
        key = json.dumps({k: v for k, v in config.items() if k not in NOT_CONFIG}, sort_keys=True, default=str)
        if soup.is_file():  # each soup mixture is its own configuration
            key += soup.read_text(encoding="utf-8")
        groups.setdefault(key, []).append(r)
    out = []
    for members in groups.values():
        if len(members) < 2 or len({json.dumps(seeds[r]) for r in members}) < 2:
            continue
        finals = np.array([normalised[np.flatnonzero(table.run_index == r)[-1]] for r in members])
        out.append(
            SeedGroup(
                runs=[table.runs[r].name for r in members],
                gains={k: stats.seed_spread(finals[:, c]) for c, k in enumerate(table.objectives)},
                hypervolume=stats.seed_spread(np.array([run_hv[r] for r in members])),
            )
        )
    return out


def _ci(i: stats.Interval) -> str:
    return f"{i.estimate:+.3g} [{i.low:+.3g}, {i.high:+.3g}]"


def _as_float(v) -> float:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return math.nan
