"""``apex doctor``: parse options, call ``apexcli.doctor.diagnose``, show its rows as one table."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from rich.table import Table

    from apexcli.doctor import Row

STATUS_STYLE = {"ok": "green", "warn": "yellow", "FAIL": "bold red"}


def doctor(
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Config overrides KEY=VALUE, as for apex train.", show_default=False)
    ] = None,
    preset: Annotated[str | None, typer.Option(help="Preset to check: tiny, mini, sd35m, sd35m-1gpu, sd35l.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML config file, applied over the preset.")] = None,
    objectives: Annotated[
        str | None, typer.Option(help="Comma-separated rewards, as for apex train (name@URL for a reward server).")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Hub id or local directory of the SD3 pipeline (model.pretrained).")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run directory whose disk is checked (out).")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Config override KEY=VALUE (repeatable), as for apex train.")
    ] = None,
) -> None:
    """Check that a preset or config can train here (versions, GPU, weights, reward backends, disk, the memory plan); exit 1 on any FAIL."""
    from apexcli.console import make_console
    from apexcli.doctor import FAIL, diagnose

    options: dict = {}
    if objectives is not None:
        options["objectives"] = [o.strip() for o in objectives.split(",") if o.strip()]
    if model is not None:
        options["model"] = {"pretrained": model}
    if out is not None:
        options["out"] = str(out)
    rows = diagnose(
        preset=preset, config_file=config, options=options, overrides=list(overrides or []) + list(set_ or [])
    )
    make_console().print(_table(rows))
    if any(row.status == FAIL for row in rows):
        raise typer.Exit(1)


def _table(rows: list[Row]) -> Table:
    """One line per check; the fix column is filled only where something must change."""
    from rich.table import Table

    table = Table(title="apex doctor", title_justify="left")
    for column in ("check", "status", "found", "fix"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row.name, f"[{STATUS_STYLE[row.status]}]{row.status}[/]", row.found, row.fix)
    return table
