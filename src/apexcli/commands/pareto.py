"""``apex pareto``: parse options, call ``apexcli.eval.report.run_pareto``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def pareto(
    runs: Annotated[
        list[Path],
        typer.Argument(
            help="Run folders (config.yaml + metrics.jsonl, made by apex train) or folders "
            "that contain runs; searched recursively."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Folder for pareto.json, report.md and the PNG plots (~ is your home); an earlier report there is kept unless --overwrite.",
        ),
    ] = Path("pareto"),
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace the pareto.json, report.md and plots already in --out."),
    ] = False,
    all_steps: Annotated[
        bool,
        typer.Option(
            "--all-steps",
            help="Use every eval step of each run as a point (default: only its final eval).",
        ),
    ] = False,
    normalize: Annotated[
        str,
        typer.Option(
            "--normalize",
            help="Per-objective normalisation before the hypervolume: 'base_std' = gain over "
            "the base model in units of its std over the eval prompts; 'spread' = gain / observed "
            "range of the objective; 'none' = raw gain; 'auto' (default) = base_std when the "
            "step-0 evals carry stds, else spread.",
        ),
    ] = "auto",
) -> None:
    """Non-dominated set, hypervolumes, plots and a report over training runs."""
    from apexcli.eval.report import run_pareto

    run_pareto(runs, out, all_steps=all_steps, normalisation=normalize, overwrite=overwrite)
