"""Read run directories (runs.py format) into eval points for ``apex pareto``.

Two steps, both tolerant of bad input:

1. ``collect_runs(paths)``: find runs, read config.yaml + metrics.jsonl, keep the eval rows
   (``kind == "eval"``, values ``eval/{k}/mean``) and the balance weights of train rows.
   A run that cannot be read or has no trained eval point is *skipped with a reason*; corrupt
   metrics lines become warnings, and so do rows apex cannot have written (a step beyond
   MAX_STEP, a NaN or infinite value: apex writes null), which are left out, never the run.
   No run found at all is an ApexError.
2. ``build_points(collection, all_steps)``: the objectives common to every run (warning when
   the sets differ) that have a finite value in some run (one that none has, such as ocr on
   eval prompts without quoted text, is left out with a note), one point per run (its last eval step > 0) or every eval step > 0, and
   the base model's point (the step-0 eval; the mean over runs, with a warning, when runs
   disagree; the per-objective minimum of the points, with a warning, when no run has one).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from apexcli.config_upgrade import upgrade_config
from apexcli.errors import ApexError
from apexcli.jsonsafe import is_finite_number
from apexcli.runs import SOUP_FILE, RunDir, find_runs

EVAL_PREFIX = "eval/"
EVAL_SUFFIX = "/mean"
WEIGHT_PREFIX = "balance/weight/"
# a billion updates: no run comes near; a larger step is a corrupt line, left out with a warning
MAX_STEP = 10**9
# step-0 points of different runs count as the same base model within this tolerance
BASE_RTOL = 1e-6
BASE_ATOL = 1e-9


@dataclass
class EvalRow:
    """One eval of one run: finite means (and stds) of each objective at ``step``."""

    step: int  # training step of the eval; 0 = the base model
    means: dict[str, float]  # objective -> eval/{k}/mean, finite values only
    stds: dict[str, float]  # objective -> eval/{k}/std, finite values only


@dataclass
class RunRecord:
    """What ``apex pareto`` knows of one readable run."""

    path: Path  # the run directory
    name: str  # config ``name``, else the folder name (made unique across runs)
    strategy: str | None  # config balance.strategy
    weights: list[float] | None  # config balance.weights (user weights)
    objectives: list[str]  # eval objectives found in its eval rows, first-seen order
    evals: list[EvalRow]  # ascending step, step 0 (base) included when present
    weight_curves: dict[str, list[tuple[int, float]]]  # objective -> [(step, w_k)] train rows


@dataclass
class SkippedRun:
    path: Path  # the run directory
    reason: str  # one line: why it was left out


@dataclass
class Collection:
    runs: list[RunRecord]
    skipped: list[SkippedRun] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class PointTable:
    """The compared points, in raw objective units (all maximised)."""

    objectives: list[str]  # common objectives, in the first run's order
    runs: list[RunRecord]  # runs with at least one point (index = run id)
    run_index: np.ndarray  # [N] int: which run each point belongs to
    steps: np.ndarray  # [N] int: eval step of each point
    values: np.ndarray  # [N, K] float: eval means
    base: np.ndarray  # [K] float: the base model's point (hypervolume reference)
    base_source: str  # one line: where ``base`` comes from
    base_std: np.ndarray | None  # [K] mean step-0 eval std per objective, None if any is missing
    skipped: list[SkippedRun]  # collection skips plus runs with no usable point
    warnings: list[str]
    left_out: list[str] = field(default_factory=list)  # objectives with no finite value anywhere, with why


def no_runs_message(paths: Sequence[Path]) -> str:
    where = ", ".join(str(p) for p in paths)
    return f"no runs found under {where}: a run is a folder with config.yaml and metrics.jsonl (made by apex train)"


def collect_runs(paths: Sequence[Path]) -> Collection:
    """Find and read every run under ``paths``; see the module docstring."""
    paths = [Path(p) for p in paths]
    found: list[RunDir] = []
    seen: set[Path] = set()
    empty_paths: list[Path] = []
    for root in paths:
        runs_here = find_runs(root)
        if not runs_here:
            empty_paths.append(root)
        for run in runs_here:
            key = run.path.resolve()
            if key not in seen:
                seen.add(key)
                found.append(run)
    if not found:
        raise ApexError(no_runs_message(paths))

    collection = Collection(runs=[])
    for root in empty_paths:
        collection.warnings.append(f"no runs found under {root}")
    for run in found:
        record = _read_run(run, collection)
        if record is not None:
            collection.runs.append(record)
    _make_names_unique(collection.runs)
    return collection


def _read_run(run: RunDir, collection: Collection) -> RunRecord | None:
    try:
        config, _ = upgrade_config(run.read_config())  # a run written before keys moved reads as today's
    except Exception as exc:  # YAML errors, not a mapping, unreadable file
        collection.skipped.append(SkippedRun(run.path, f"config.yaml unreadable: {_one_line(exc)}"))
        return None
    metrics = run.read_metrics()
    if metrics.skipped:
        shown = "; ".join(metrics.skipped[:3]) + ("; ..." if len(metrics.skipped) > 3 else "")
        collection.warnings.append(f"{run.path}: skipped {len(metrics.skipped)} corrupt metrics.jsonl line(s): {shown}")
    rows, bad = _plausible_rows(metrics.rows)
    if bad:
        shown = "; ".join(bad[:3]) + ("; ..." if len(bad) > 3 else "")
        collection.warnings.append(f"{run.path}: left out {len(bad)} metrics row(s) apex cannot have written: {shown}")
    if not rows:
        collection.skipped.append(SkippedRun(run.path, "metrics.jsonl has no readable rows"))
        return None

    evals_by_step: dict[int, EvalRow] = {}
    objectives: list[str] = []
    weight_curves: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        if row.get("kind") == "eval":
            entry = evals_by_step.setdefault(row["step"], EvalRow(row["step"], {}, {}))
            for key, value in row.items():
                objective = _eval_objective(key)
                if objective is None:
                    continue
                if objective not in objectives:
                    objectives.append(objective)
                if is_finite_number(value):
                    entry.means[objective] = float(value)
                else:  # a later null replaces an earlier value for the same step
                    entry.means.pop(objective, None)
                std = row.get(f"{EVAL_PREFIX}{objective}/std")
                if is_finite_number(std):
                    entry.stds[objective] = float(std)
        else:
            for key, value in row.items():
                if key.startswith(WEIGHT_PREFIX) and is_finite_number(value):
                    objective = key[len(WEIGHT_PREFIX) :]
                    weight_curves.setdefault(objective, []).append((row["step"], float(value)))

    evals = [evals_by_step[s] for s in sorted(evals_by_step)]
    if not evals:
        collection.skipped.append(SkippedRun(run.path, "no eval rows in metrics.jsonl (train with evaluation on)"))
        return None
    if all(e.step == 0 for e in evals):
        collection.skipped.append(SkippedRun(run.path, "only the base-model eval (step 0): no trained eval point yet"))
        return None

    balance = config.get("balance") if isinstance(config.get("balance"), dict) else {}
    soup = soup_info(run.path)
    if soup is not None:  # an apex soup mixture: its "strategy" is soup, its weights the coefficients
        balance = {"strategy": "soup", "weights": soup.get("coefficients")}
    weights = balance.get("weights")
    if not (isinstance(weights, list) and all(is_finite_number(w) for w in weights)):
        weights = None  # absent or malformed user weights are shown as "-", never fatal
    return RunRecord(
        path=run.path,
        name=str(config.get("name") or run.path.name),
        strategy=None if balance.get("strategy") is None else str(balance["strategy"]),
        weights=[float(w) for w in weights] if weights is not None else None,
        objectives=objectives,
        evals=evals,
        weight_curves={k: sorted(v) for k, v in weight_curves.items()},
    )


def _plausible_rows(rows: list[dict]) -> tuple[list[dict], list[str]]:
    """(rows apex can have written, why each other one is not): its step is in 0..MAX_STEP and
    every number is finite (apex writes null for NaN and infinities; a bare NaN or Infinity in
    the file came from elsewhere). One such row costs itself, never the run."""
    kept, bad = [], []
    for row in rows:
        step = row["step"]
        odd = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
        if not 0 <= step <= MAX_STEP:
            bad.append(f"step {step} is outside 0..{MAX_STEP}")
        elif odd:
            bad.append(f"step {step}: {odd[0]} is {row[odd[0]]} (apex writes null)")
        else:
            kept.append(row)
    return kept, bad


def _with_values(runs: list[RunRecord], objectives: list[str]) -> tuple[list[str], list[str]]:
    """(objectives with a finite trained eval value in some run, a note for each other one)."""
    kept, notes = [], []
    for k in objectives:
        if any(k in e.means for run in runs for e in run.evals if e.step > 0):
            kept.append(k)
        else:
            notes.append(
                f"{k}: no finite eval value in any run (none of the eval prompts applies to it, "
                f"e.g. no quoted text for ocr); left out of the comparison"
            )
    if not kept:
        raise ApexError(
            f"no objective has a finite eval value in any run ({', '.join(objectives)}): "
            "evaluate on prompts the objectives apply to"
        )
    return kept, notes


def build_points(collection: Collection, all_steps: bool = False) -> PointTable:
    """Points of every run on the common objectives, plus the base point; module docstring."""
    skipped = list(collection.skipped)
    warnings = list(collection.warnings)
    runs = collection.runs
    if not runs:
        raise ApexError(_all_skipped_message(skipped))

    objectives = [k for k in runs[0].objectives if all(k in r.objectives for r in runs)]
    if any(set(r.objectives) != set(runs[0].objectives) for r in runs):
        sets = "; ".join(f"{r.name}: {','.join(r.objectives)}" for r in runs)
        if not objectives:
            raise ApexError(
                f"the runs share no eval objective ({sets}): compare runs evaluated on at least one common objective"
            )
        warnings.append(
            f"runs evaluate different objectives ({sets}); comparing on the common ones: {','.join(objectives)}"
        )

    objectives, left_out = _with_values(runs, objectives)
    kept: list[RunRecord] = []
    run_index: list[int] = []
    steps: list[int] = []
    values: list[list[float]] = []
    for run in runs:
        trained = [e for e in run.evals if e.step > 0]
        candidates = trained if all_steps else trained[-1:]
        usable = [e for e in candidates if all(k in e.means for k in objectives)]
        missing = [e.step for e in candidates if e not in usable]
        if not usable:
            last = candidates[-1]
            lacking = ",".join(k for k in objectives if k not in last.means)
            skipped.append(SkippedRun(run.path, f"eval at step {last.step} has no finite value for {lacking}"))
            continue
        if missing:
            warnings.append(f"{run.name}: eval steps {','.join(map(str, missing))} have non-finite values; left out")
        for e in usable:
            run_index.append(len(kept))
            steps.append(e.step)
            values.append([e.means[k] for k in objectives])
        kept.append(run)
    if not kept:
        raise ApexError(_all_skipped_message(skipped))

    points = np.asarray(values, dtype=float)
    base, base_source = _base_point(kept, objectives, points, warnings)
    base_std = _base_std(kept, objectives)
    return PointTable(
        objectives=objectives,
        runs=kept,
        run_index=np.asarray(run_index, dtype=int),
        steps=np.asarray(steps, dtype=int),
        values=points,
        base=base,
        base_source=base_source,
        base_std=base_std,
        skipped=skipped,
        warnings=warnings,
        left_out=left_out,
    )


def _base_point(
    runs: list[RunRecord], objectives: list[str], points: np.ndarray, warnings: list[str]
) -> tuple[np.ndarray, str]:
    base_rows = []
    for run in runs:
        zero = next((e for e in run.evals if e.step == 0), None)
        if zero is not None and all(k in zero.means for k in objectives):
            base_rows.append([zero.means[k] for k in objectives])
    if not base_rows:
        warnings.append(
            "no run has a finite step-0 (base model) eval: the reference point is the lowest "
            "value of each objective among the compared points"
        )
        return points.min(axis=0), "lowest value of each objective among the points (no step-0 eval)"
    rows = np.asarray(base_rows, dtype=float)
    base = rows.mean(axis=0)
    n = len(base_rows)
    if np.all(rows == rows[0]):
        return rows[0], f"step-0 eval (base model), identical in {n} run(s)"
    if not np.allclose(rows, base[None, :], rtol=BASE_RTOL, atol=BASE_ATOL):
        spread = ", ".join(
            f"{k}: {lo:.4g}..{hi:.4g}"
            for k, lo, hi in zip(objectives, rows.min(axis=0), rows.max(axis=0))
            if hi - lo > BASE_ATOL + BASE_RTOL * abs(hi)
        )
        warnings.append(
            f"step-0 (base model) evals differ across runs ({spread}); using their mean as the "
            "reference (same base model, eval prompts and seeds give identical step-0 scores)"
        )
        return base, f"mean of the step-0 evals of {n} runs (they differ)"
    return base, f"step-0 eval (base model), identical in {n} run(s)"


def _base_std(runs: list[RunRecord], objectives: list[str]) -> np.ndarray | None:
    """Mean over runs of the step-0 eval std of each objective; None unless every run has all."""
    rows = []
    for run in runs:
        zero = next((e for e in run.evals if e.step == 0), None)
        if zero is None or not all(k in zero.stds for k in objectives):
            return None
        rows.append([zero.stds[k] for k in objectives])
    return np.asarray(rows, dtype=float).mean(axis=0) if rows else None


def soup_info(run_path: Path) -> dict | None:
    """soup.json of a mixture made by ``apex soup`` (None for a trained run or a bad file)."""
    path = run_path / SOUP_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _make_names_unique(runs: list[RunRecord]) -> None:
    """Runs sharing a name are told apart by their folder path."""
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.name] = counts.get(r.name, 0) + 1
    for r in runs:
        if counts[r.name] > 1:
            r.name = f"{r.name} ({r.path})"


def _all_skipped_message(skipped: list[SkippedRun]) -> str:
    first = f" (first: {skipped[0].path}: {skipped[0].reason})" if skipped else ""
    return f"no usable run: every run found was skipped{first}; fix or remove those runs"


def _eval_objective(key: str) -> str | None:
    if key.startswith(EVAL_PREFIX) and key.endswith(EVAL_SUFFIX):
        name = key[len(EVAL_PREFIX) : -len(EVAL_SUFFIX)]
        return name or None
    return None


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
