"""``apex sweep``: parse options, call ``apexcli.sweep.run_sweep``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from apexcli.sweep import MAX_RUNS


def sweep(
    objectives: Annotated[
        str,
        typer.Option("--objectives", help="Comma-separated objectives, e.g. brightness,contrast."),
    ],
    points: Annotated[
        int,
        typer.Option(
            "--points",
            help="Points per edge of the weight simplex (N-1 divisions; K=2, N=5 gives "
            "weights 0, .25, .5, .75, 1; C(N+K-2, K-1) runs in all).",
        ),
    ] = 5,
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Sweep folder; each run goes to <out>/w-<w1>-<w2>-..."),
    ] = Path("runs/sweep"),
    steps: Annotated[
        int | None,
        typer.Option("--steps", help="Training steps per run (default: the preset's)."),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option("--preset", help="Preset passed to every apex train run."),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="Config YAML passed to every apex train run."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="KEY=VALUE config override passed to every run; repeat for several."),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print the apex train command lines; launch nothing."),
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", help="Continue an interrupted sweep: every run gets --resume auto (finished runs only load)."
        ),
    ] = False,
    max_runs: Annotated[
        int,
        typer.Option("--max-runs", help="Refuse a sweep of more runs than this (each is a full training run)."),
    ] = MAX_RUNS,
) -> None:
    """Static-weight runs over a simplex grid: the fixed-weight frontier to compare APEX with."""
    from apexcli.sweep import run_sweep

    run_sweep(
        objectives.split(","),
        points,
        out,
        preset=preset,
        steps=steps,
        config=config,
        overrides=set_ or [],
        dry_run=dry_run,
        resume=resume,
        max_runs=max_runs,
    )
