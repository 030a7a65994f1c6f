"""``apex pareto``: runs -> front, hypervolumes, pareto.json, plots, report.md, terminal table.

``run_pareto`` is the one core function the CLI calls. The math lives in ``pareto.py``
(dominance, normalisation, hypervolume: read its docstring for the exact formulas), the
reading in ``collect.py``, the figures in ``plots.py``; this module joins them and writes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from apexcli.console import make_console
from apexcli.errors import ApexError
from apexcli.eval import paired as paired_stats
from apexcli.eval import plots
from apexcli.eval.collect import PointTable, build_points, collect_runs, soup_info
from apexcli.eval.pareto import (
    NORMALISATIONS,
    Normalisation,
    fit_normalisation,
    hypervolume,
    nondominated_mask,
    usable_base_std,
)
from apexcli.eval.strip import Strip, write_strip
from apexcli.runs import atomic_write_text

JSON_FILE = "pareto.json"
REPORT_FILE = "report.md"
SCATTER_FILE = "scatter_matrix.png"
RADAR_FILE = "radar.png"  # 3+ objectives
GAINS_FILE = "gains.png"  # 1-2 objectives, where a radar chart degenerates to a line
EVAL_CURVES_FILE = "eval_curves.png"
WEIGHTS_FILE = "balance_weights.png"
MAX_PAIRS_PRINTED = 10  # run-vs-run sentences on the terminal; report.md and pareto.json hold all


@dataclass
class ParetoResult:
    """Everything ``apex pareto`` computed (also written to pareto.json)."""

    table: PointTable  # the compared points (raw), runs, base point, skips, warnings
    normalisation: Normalisation
    normalised: np.ndarray  # [N, K] normalised points
    on_front: np.ndarray  # [N] bool: point is non-dominated among all points
    run_hypervolume: list[float]  # per run: HV of its own points (1 point, or its steps)
    front_hypervolume: float  # HV of all points (= of the front)
    plots: list[plots.PlotFile]  # PNGs written
    json_path: Path
    report_path: Path
    paired: paired_stats.PairedReport | None = None  # per-prompt paired statistics (eval.paired)
    soups: SoupFronts | None = None  # soup front beside the sweep front, when soup runs are compared
    strip: Strip | None = None  # base model vs each run on the same eval prompts and seeds


@dataclass
class SoupFronts:
    """Runs made by ``apex soup`` (soup.json) and their parents, against the other runs."""

    soup_runs: list[str]  # soup mixtures compared
    parents: list[str]  # compared runs that are a parent of a soup
    soup_hypervolume: float  # HV of the soups' and their parents' points
    sweep_runs: list[str]  # every compared run that is not a soup
    sweep_hypervolume: float  # HV of those runs' points


def run_pareto(
    paths: Sequence[Path],
    out: Path,
    *,
    all_steps: bool = False,
    normalisation: str = "auto",
    console: Console | None = None,
    err_console: Console | None = None,
    overwrite: bool = False,
) -> ParetoResult:
    """Compare the runs under ``paths`` and write pareto.json, PNG plots and report.md to ``out``
    (refused when an earlier report is there, unless ``overwrite``). Objectives without a finite
    value in any run are left out with a note in the report and on ``err_console`` (stderr).

    Points: each run's final eval (its last eval step > 0), or every eval step > 0 when
    ``all_steps``. Reference: the base model (step-0 eval). Normalisation: see
    ``apexcli.eval.pareto`` (``"auto"``: ``"base_std"`` — gain over the base in units of the base
    model's std over the eval prompts — when every step-0 eval carries stds, else ``"spread"``:
    gain over the base / observed range per objective; ``"none"``: raw gain). A run's hypervolume is that of its own point(s); the front's is that
    of all points. Unusable runs are skipped with a reason; no run at all is an ApexError.
    """
    console = console or make_console()
    err_console = err_console or make_console(stderr=True)
    if normalisation not in ("auto", *NORMALISATIONS):
        raise ApexError(f"unknown normalisation {normalisation!r}: use one of auto, {', '.join(NORMALISATIONS)}")
    out = Path(out).expanduser()
    check_outputs_free(out, overwrite)
    table = build_points(collect_runs([Path(p).expanduser() for p in paths]), all_steps=all_steps)
    for note in table.left_out:
        err_console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    has_std = usable_base_std(table.base_std, len(table.objectives))
    if normalisation == "auto":
        normalisation = "base_std" if has_std else "spread"
        if not has_std:
            table.warnings.append("step-0 evals carry no usable std per objective: normalising by the observed spread")
    elif normalisation == "base_std" and not has_std:
        raise ApexError(
            "--normalize base_std needs a positive eval/{k}/std in every run's step-0 eval; use spread or none"
        )
    norm = fit_normalisation(table.values, table.base, normalisation, table.base_std)
    normalised = norm.apply(table.values)
    on_front = nondominated_mask(normalised)
    origin = np.zeros(len(table.objectives))
    run_hv = [hypervolume(normalised[table.run_index == r], origin) for r in range(len(table.runs))]
    front_hv = hypervolume(normalised[on_front], origin)

    out.mkdir(parents=True, exist_ok=True)
    result = ParetoResult(
        table=table,
        normalisation=norm,
        normalised=normalised,
        on_front=on_front,
        run_hypervolume=run_hv,
        front_hypervolume=front_hv,
        plots=[],
        json_path=out / JSON_FILE,
        report_path=out / REPORT_FILE,
    )
    result.paired = paired_stats.analyse(table, norm.scale, run_hv, normalised)
    result.soups = _soup_fronts(result)
    result.plots = _write_plots(result, out)
    final_steps = {
        run.name: int(table.steps[np.flatnonzero(table.run_index == r)[-1]]) for r, run in enumerate(table.runs)
    }
    result.strip = write_strip(table.runs, final_steps, out)
    if result.strip is not None:
        table.warnings.extend(result.strip.warnings)
    atomic_write_text(result.json_path, json.dumps(_to_json(result, all_steps), indent=2) + "\n")
    atomic_write_text(result.report_path, _report_markdown(result, all_steps))
    _print_terminal(result, console)
    return result


def check_outputs_free(out: Path, overwrite: bool) -> None:
    """ApexError when ``out`` already holds a report (``--out .`` replaced one without a word)
    and ``overwrite`` is off. Checked before any run is read."""
    if overwrite:
        return
    existing = [name for name in (REPORT_FILE, JSON_FILE) if (out / name).exists()]
    if existing:
        raise ApexError(
            f"'{out / existing[0]}' exists (an earlier apex pareto?); pass --overwrite to replace it, "
            "or choose another --out"
        )


# -- pareto.json ---------------------------------------------------------------------------


def _to_json(result: ParetoResult, all_steps: bool) -> dict:
    t, norm = result.table, result.normalisation
    runs = []
    for r, run in enumerate(t.runs):
        idx = np.flatnonzero(t.run_index == r)
        runs.append(
            {
                "name": run.name,
                "path": str(run.path),
                "strategy": run.strategy,
                "weights": run.weights,
                "hypervolume": result.run_hypervolume[r],
                "on_front": bool(result.on_front[idx].any()),
                "points": [
                    {
                        "step": int(t.steps[i]),
                        "values": _named(t.objectives, t.values[i]),
                        "normalised": _named(t.objectives, result.normalised[i]),
                        "on_front": bool(result.on_front[i]),
                    }
                    for i in idx
                ],
            }
        )
    front = np.flatnonzero(result.on_front)
    return {
        "objectives": t.objectives,
        "points": "every eval step > 0" if all_steps else "final eval of each run",
        "maximise": True,
        "reference": {
            "values": _named(t.objectives, t.base),
            "normalised": _named(t.objectives, norm.apply(t.base)[0]),
            "source": t.base_source,
        },
        "normalisation": {
            "method": norm.method,
            "formula": norm.describe(),
            "base": _named(t.objectives, norm.base),
            "scale": _named(t.objectives, norm.scale),
        },
        "front": {
            "hypervolume": result.front_hypervolume,
            "members": [{"run": t.runs[t.run_index[i]].name, "step": int(t.steps[i])} for i in front],
        },
        "runs": runs,
        "skipped": [{"path": str(s.path), "reason": s.reason} for s in t.skipped],
        "left_out": t.left_out,
        "warnings": t.warnings,
        "plots": [p.path.name for p in result.plots],
        "paired": result.paired.to_json() if result.paired is not None else None,
        "soups": _soups_json(result.soups),
        "samples": None
        if result.strip is None
        else {
            "file": result.strip.path.name,
            "rows": result.strip.rows,
            "objectives": result.strip.objectives,
            "columns": [{"prompt": p, "seed": s} for p, s in result.strip.prompts],
        },
    }


def _named(objectives: Sequence[str], values: np.ndarray) -> dict[str, float]:
    return {k: float(v) for k, v in zip(objectives, values)}


# -- plots ---------------------------------------------------------------------------------


def _write_plots(result: ParetoResult, out: Path) -> list[plots.PlotFile]:
    t = result.table
    colors = plots.run_colors(len(t.runs))
    series = []
    for r, run in enumerate(t.runs):
        idx = np.flatnonzero(t.run_index == r)
        series.append(
            plots.RunSeries(
                name=run.name,
                color=colors[r],
                values=t.values[idx],
                normalised=result.normalised[idx],
                on_front=result.on_front[idx],
            )
        )
    k = len(t.objectives)
    written = []
    if k >= 2:  # one objective has no pairs to scatter; the gains chart shows it
        written.append(plots.scatter_matrix(out / SCATTER_FILE, t.objectives, series, t.base))
    if k >= 3:
        written.append(plots.radar(out / RADAR_FILE, t.objectives, series))
    else:
        written.append(plots.gain_bars(out / GAINS_FILE, t.objectives, series))
    eval_lines = []
    for run, color in zip(t.runs, colors):
        data = {}
        for k in t.objectives:
            pts = [(e.step, e.means[k]) for e in run.evals if k in e.means]
            data[k] = ([s for s, _ in pts], [v for _, v in pts])
        eval_lines.append((run.name, color, data))
    written.append(
        plots.curves(
            out / EVAL_CURVES_FILE,
            t.objectives,
            eval_lines,
            "eval mean",
            "Eval means over training steps (step 0 = base model)",
        )
    )
    weight_lines = [
        (run.name, color, {k: ([s for s, _ in c], [w for _, w in c]) for k, c in run.weight_curves.items()})
        for run, color in zip(t.runs, colors)
        if run.weight_curves
    ]
    if weight_lines:
        names = []
        for _, _, data in weight_lines:
            names += [k for k in data if k not in names]
        written.append(
            plots.curves(out / WEIGHTS_FILE, names, weight_lines, "weight w_k", "Balance weights over training steps")
        )
    return written


# -- report.md and the terminal table --------------------------------------------------------


def _rows(result: ParetoResult) -> list[dict]:
    """One summary row per run: its last point, its hypervolume, its front steps."""
    t = result.table
    rows = []
    for r, run in enumerate(t.runs):
        idx = np.flatnonzero(t.run_index == r)
        last = idx[-1]
        front_steps = [int(t.steps[i]) for i in idx if result.on_front[i]]
        rows.append(
            {
                "run": run.name,
                "strategy": run.strategy or "?",
                "weights": "-" if run.weights is None else ",".join(f"{w:.3g}" for w in run.weights),
                "step": str(int(t.steps[last])),
                "values": [_fmt(v) for v in t.values[last]],
                "gains": [_fmt(v) for v in result.normalised[last]],
                "hv": _fmt(result.run_hypervolume[r]),
                "front": ("yes" if len(idx) == 1 else "steps " + ",".join(map(str, front_steps)))
                if front_steps
                else "no",
            }
        )
    return rows


def _report_markdown(result: ParetoResult, all_steps: bool) -> str:
    t, norm = result.table, result.normalisation
    ks = t.objectives
    lines = [
        "# apex pareto report",
        "",
        f"- Runs compared: {len(t.runs)} (skipped: {len(t.skipped)}), on objectives: {', '.join(ks)} (all maximised).",
        f"- Points: {'every eval step > 0 of each run' if all_steps else 'the final eval of each run'}.",
        *(f"- Left out: {note}." for note in t.left_out),
        f"- Reference point (base model): {_fmt_named(ks, t.base)}; {t.base_source}.",
        f"- Normalisation `{norm.method}`: {norm.describe()}.",
        f"- Scale s_k: {_fmt_named(ks, norm.scale)}.",
        "- Hypervolume: volume of the normalised region dominated by the points and dominating "
        "the reference (the origin); a run's HV uses its own point(s), the front's uses all.",
        "",
        f"**Front hypervolume: {_fmt(result.front_hypervolume)}**",
        "",
    ]
    header = ["run", "strategy", "weights", "step"] + ks + [f"gain {k}" for k in ks] + ["HV", "front"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in _rows(result):
        cells = [
            row["run"],
            row["strategy"],
            row["weights"],
            row["step"],
            *row["values"],
            *row["gains"],
            row["hv"],
            row["front"],
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines.append("")
    captions = {
        plots_name: caption
        for plots_name, caption in [
            (SCATTER_FILE, "Pairwise eval means; ringed points are on the Pareto front, the star is the base model"),
            (RADAR_FILE, "Normalised gain of each run over the base model"),
            (GAINS_FILE, "Normalised gain of each run over the base model"),
            (EVAL_CURVES_FILE, "Eval means over training steps"),
            (WEIGHTS_FILE, "Balance weights over training steps"),
        ]
    }
    for p in result.plots:
        lines += [f"## {captions[p.path.name]}", "", f"![{captions[p.path.name]}]({p.path.name})", ""]
    if result.strip is not None:
        lines += [
            "## Samples: the same eval prompts and seeds, base model and each run",
            "",
            f"![samples]({result.strip.path.name})",
            "",
            "Rows: "
            + "; ".join(result.strip.rows)
            + "."
            + (
                " Under each tile its scores (" + ", ".join(result.strip.objectives) + "): the base model's"
                " values, and each run's change from them, green up and red down."
                if result.strip.objectives
                else ""
            )
            + " Columns:",
            "",
        ]
        lines += [f"{i}. {p} (seed {s})" for i, (p, s) in enumerate(result.strip.prompts, 1)] + [""]
    lines += _paired_markdown(result) + _soups_markdown(result.soups)
    if t.skipped:
        lines += ["## Skipped runs", ""] + [f"- `{s.path}`: {s.reason}" for s in t.skipped] + [""]
    if t.warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in t.warnings] + [""]
    return "\n".join(lines)


def _print_terminal(result: ParetoResult, console: Console) -> None:
    t = result.table
    for s in t.skipped:
        console.print(f"[yellow]skipped[/] {escape(f'{s.path}: {s.reason}')}", highlight=False)
    for w in t.warnings:
        console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False)
    table = Table(title=f"Pareto comparison ({result.normalisation.method} normalisation)")
    for col in ["run", "strategy", "weights", "step", *t.objectives, "HV", "front"]:
        text = col in ("run", "strategy", "front")
        table.add_column(
            col, justify="left" if text else "right", overflow="fold", min_width=12 if col == "run" else None
        )
    for row in _rows(result):
        table.add_row(
            escape(row["run"]),
            escape(row["strategy"]),
            row["weights"],
            row["step"],
            *row["values"],
            row["hv"],
            row["front"],
        )
    console.print(table)
    console.print(f"front hypervolume: {_fmt(result.front_hypervolume)}")
    _print_paired(result, console)
    console.print(
        escape(f"wrote {result.json_path}, {result.report_path} and {len(result.plots)} plots"),
        highlight=False,
    )


def _fmt(value: float) -> str:
    return "nan" if not math.isfinite(value) else f"{value:.4g}"


def _fmt_named(objectives: Sequence[str], values: np.ndarray) -> str:
    return ", ".join(f"{k}={_fmt(float(v))}" for k, v in zip(objectives, values))


# -- paired statistics and soups (eval.paired, apex soup) ------------------------------------


def _soup_fronts(result: ParetoResult) -> SoupFronts | None:
    """The front soups trace (soups + their parents) beside the front of every other run."""
    t = result.table
    soups, parents = [], set()
    by_path = {run.path.resolve(): r for r, run in enumerate(t.runs)}
    for r, run in enumerate(t.runs):
        info = soup_info(run.path)
        if info is None:
            continue
        soups.append(r)
        for parent in info.get("parents", []):
            hit = by_path.get(Path(parent).resolve())
            if hit is not None:
                parents.add(hit)
    if not soups:
        return None
    origin = np.zeros(len(t.objectives))
    soup_members = sorted(set(soups) | parents)
    sweep = [r for r in range(len(t.runs)) if r not in soups]

    def hv(members: list[int]) -> float:
        mask = np.isin(t.run_index, members)
        return hypervolume(result.normalised[mask], origin) if mask.any() else 0.0

    return SoupFronts(
        soup_runs=[t.runs[r].name for r in soups],
        parents=[t.runs[r].name for r in sorted(parents)],
        soup_hypervolume=hv(soup_members),
        sweep_runs=[t.runs[r].name for r in sweep],
        sweep_hypervolume=hv(sweep),
    )


def _soups_json(soups: SoupFronts | None) -> dict | None:
    if soups is None:
        return None
    return {
        "soup_front": {"runs": soups.soup_runs, "parents": soups.parents, "hypervolume": soups.soup_hypervolume},
        "sweep_front": {"runs": soups.sweep_runs, "hypervolume": soups.sweep_hypervolume},
    }


def _soups_markdown(soups: SoupFronts | None) -> list[str]:
    if soups is None:
        return []
    return [
        "## Soups beside the sweep",
        "",
        "Rewarded soups (`apex soup`) interpolate the LoRA weights of trained runs: the front they "
        "trace costs no training beyond their parents, where a sweep pays one run per weight vector.",
        "",
        "| front | runs | hypervolume |",
        "|---|---|---|",
        f"| soups + parents | {len(soups.soup_runs)} soups of {', '.join(soups.parents) or '(parents not compared)'} "
        f"| {_fmt(soups.soup_hypervolume)} |",
        f"| every other run (sweep) | {', '.join(soups.sweep_runs) or '-'} | {_fmt(soups.sweep_hypervolume)} |",
        "",
    ]


def _ci_text(interval) -> str:
    if not math.isfinite(interval.estimate):
        return "-"
    return f"{interval.estimate:+.3g} [{interval.low:+.3g}, {interval.high:+.3g}]"


def _rate(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{100 * x:.0f}%"


def _paired_rows(result: ParetoResult) -> list[tuple[str, list[str]]]:
    """(run, cells): n, per objective gain [CI] and win rate, joint win, joint collapse, HV [CI]."""
    rows = []
    for run in result.table.runs:
        s = result.paired.runs.get(run.name) if result.paired is not None else None
        if s is None:
            continue
        cells = [str(s.n_prompts)]
        for k in result.table.objectives:
            g = s.gains[k]
            cells += [_ci_text(g.mean), _rate(g.win_rate)]
        cells += [_rate(s.joint.win), _rate(s.joint.collapse), _ci_text(s.hypervolume)]
        rows.append((run.name, cells))
    return rows


def _paired_markdown(result: ParetoResult) -> list[str]:
    p = result.paired
    if p is None or (not p.runs and not p.warnings):
        return []
    ks = result.table.objectives
    lines = [
        "## Paired statistics over the eval prompts",
        "",
        "Every run's image of prompt p shares its prompt and initial noise with the base model's, so "
        "each comparison is paired by prompt. Gain: mean over prompts of (run - base) in raw units, "
        "with a 95 % paired bootstrap CI; win: share of prompts where the run beats the base (ties are "
        "not wins); joint win / collapse: share of prompts where the run beats / loses to the base on "
        "every objective; HV: the run's hypervolume with a 95 % bootstrap CI over prompts "
        f"({p.n_boot} resamples, or all n^n resamples when fewer). These intervals cover the choice of "
        "eval prompts for *these* trained weights; they do not cover training noise: for that, compare "
        "runs that differ only in seed (spread over seeds, below, when present).",
        "",
    ]
    if p.runs:
        header = (
            ["run", "n"]
            + [c for k in ks for c in (f"gain {k} [CI]", f"win {k}")]
            + ["joint win", "joint collapse", "HV [CI]"]
        )
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name, cells in _paired_rows(result):
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in [name, *cells]) + " |")
        lines.append("")
        same_as_base = [n for n, s in p.runs.items() if not s.distinguishable_from_base()]
        if same_as_base:
            lines += [
                f"- Not distinguishable from the base model (every gain's CI contains 0): {', '.join(same_as_base)}."
            ]
    if p.pairs:
        lines += ["", "### Run against run", ""] + [f"- {pair.sentence()}" for pair in p.pairs]
    if p.seed_groups:
        lines += ["", "### Spread over seeds (same config, different seed)", ""]
        for g in p.seed_groups:
            gains = ", ".join(f"{k} {m:+.3g} ± {s:.3g}" for k, (m, s) in g.gains.items())
            hv_m, hv_s = g.hypervolume
            lines.append(
                f"- {', '.join(g.runs)}: normalised gain (mean ± std over seeds) {gains}; HV {hv_m:.3g} ± {hv_s:.3g}."
            )
    if p.warnings:
        lines += [""] + [f"- warning: {w}" for w in p.warnings]
    return lines + [""]


def _print_paired(result: ParetoResult, console: Console) -> None:
    p = result.paired
    if p is None:
        return
    for w in p.warnings:
        console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False)
    rows = _paired_rows(result)
    if rows:
        table = Table(title="Paired over eval prompts: gain over base [95% CI], win rate, joint rates")
        ks = result.table.objectives
        for col in [
            "run",
            "n",
            *[c for k in ks for c in (f"gain {k}", f"win {k}")],
            "joint win",
            "joint collapse",
            "HV [CI]",
        ]:
            table.add_column(col, justify="left" if col == "run" else "right", overflow="fold")
        for name, cells in rows:
            table.add_row(escape(name), *cells)
        console.print(table)
    for pair in p.pairs[:MAX_PAIRS_PRINTED]:
        console.print(escape(pair.sentence()), highlight=False)
    if len(p.pairs) > MAX_PAIRS_PRINTED:
        console.print(
            f"... {len(p.pairs) - MAX_PAIRS_PRINTED} more run-vs-run comparisons in {REPORT_FILE}", highlight=False
        )
    for g in p.seed_groups:
        hv_m, hv_s = g.hypervolume
        console.print(escape(f"seeds of {', '.join(g.runs)}: HV {hv_m:.3g} ± {hv_s:.3g}"), highlight=False)
