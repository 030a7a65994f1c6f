"""``apex eval``: parse options, call ``apexcli.eval.evaluator.evaluate_checkpoint``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def evaluate(
    run: Annotated[Path, typer.Argument(help="Run directory made by apex train.")],
    checkpoint: Annotated[
        str | None, typer.Option(help="Checkpoint dir (default: the run's newest), or 'base' for the base model.")
    ] = None,
    log: Annotated[bool, typer.Option(help="Also append the eval row to the run's metrics.jsonl.")] = False,
    prompts: Annotated[
        str | None,
        typer.Option(
            help="Evaluate on another prompt set (a .txt/.jsonl file or builtin:NAME); written to eval/set-.../, not the run's rows."
        ),
    ] = None,
    num_prompts: Annotated[
        int | None, typer.Option(help="How many of the set's prompts (default: the run's eval.num_prompts).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Eval noise seed (default: the run's eval.seed).")] = None,
) -> None:
    """Re-run a run's held-out evaluation on one of its checkpoints, or evaluate it on another set."""
    from apexcli.eval.evaluator import evaluate_checkpoint
    from apexcli.rewards.hub import override_hint

    # eval takes no overrides: the rewards' sources come from the run's config.yaml
    with override_hint(f"set {{option}} to DIR in {run / 'config.yaml'}"):
        row = evaluate_checkpoint(run, checkpoint, log=log, prompts=prompts, num_prompts=num_prompts, seed=seed)
    for key, value in row.items():
        if key.startswith("eval/"):
            typer.echo(f"{key:<32} {value:.6g}")
    typer.echo(f"wrote {row['eval_dir']}/ (grid.png, scores.jsonl)")
