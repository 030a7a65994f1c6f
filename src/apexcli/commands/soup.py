"""``apex soup``: parse options, call ``apexcli.soup.make_soups``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def soup(
    runs: Annotated[
        list[Path],
        typer.Argument(
            help="Two or more run directories made by apex train (same base model, LoRA shape and eval setup)."
        ),
    ],
    coef: Annotated[
        list[str] | None,
        typer.Option(
            "--coef",
            help="Mixture coefficients, one per run, >= 0, summing to 1 (e.g. 0.25,0.75); repeat for several mixtures. Default for two runs: 0.75,0.25 / 0.5,0.5 / 0.25,0.75.",
        ),
    ] = None,
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="Folder for the mixture runs (one soup-<coefficients>/ each; ~ is your home)."
        ),
    ] = Path("soups"),
    evaluate: Annotated[
        bool,
        typer.Option(help="Evaluate each mixture with the runs' eval config (--no-evaluate: write the LoRAs only)."),
    ] = True,
) -> None:
    """Rewarded soups: interpolate the LoRA weights of trained runs and evaluate each mixture."""
    from apexcli.soup import make_soups, parse_coefficients

    runs, out = [run.expanduser() for run in runs], out.expanduser()
    made = make_soups(runs, parse_coefficients(coef or [], len(runs)), out, evaluate=evaluate)
    for folder in made:
        typer.echo(f"wrote {folder}")
    if evaluate:
        typer.echo(f"compare them with: apex pareto {' '.join(map(str, runs))} {out}")
