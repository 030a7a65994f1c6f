"""``apex train``: parse options, call ``apexcli.train.run_training``."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Annotated

import typer


def train(
    overrides: Annotated[
        list[str] | None,
        typer.Argument(
            help="Config overrides KEY=VALUE, dotted, e.g. train.lr=1e-4 balance.apex.tau=0.5.", show_default=False
        ),
    ] = None,
    preset: Annotated[
        str | None, typer.Option(help="Preset to start from: tiny, mini, sd35m, sd35m-1gpu, sd35l.")
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML config file, applied over the preset.")] = None,
    objectives: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated rewards to optimise, e.g. pick,deqa,aes,ocr (name@URL for a reward server)."
        ),
    ] = None,
    balance: Annotated[
        str | None, typer.Option(help="Balancing strategy: apex, gdpo, static, dwa, mgda, random, pareto.")
    ] = None,
    weights: Annotated[
        str | None, typer.Option(help="Comma-separated user weights, one per objective (balance.weights).")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Training iterations (train.steps).")] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Run directory (config, metrics.jsonl, checkpoints, eval).")
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option(help="'auto' (newest readable checkpoint of --out, or start fresh) or a checkpoint/run path."),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Delete the run already in --out (config, metrics, checkpoints, eval) and start a new one.",
        ),
    ] = False,
    eval_every: Annotated[
        int | None, typer.Option(help="Evaluate at step 0, every N steps and at the end (eval.every); 0 = off.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of prompts, noise and LoRA init.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N (model.device).")] = None,
    model: Annotated[
        str | None, typer.Option(help="Hub id or local directory of the SD3 pipeline (model.pretrained).")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Config override KEY=VALUE (repeatable; same as a positional override)."),
    ] = None,
) -> None:
    """Train a LoRA with GRPO on several rewards at once (APEX balancing by default)."""
    from apexcli.train import run_training

    parsed = dict(locals())

    options: dict = {}
    if objectives is not None:
        options["objectives"] = [o.strip() for o in objectives.split(",") if o.strip()]
    if balance is not None:
        options.setdefault("balance", {})["strategy"] = balance
    if weights is not None:
        options.setdefault("balance", {})["weights"] = [w.strip() for w in weights.split(",")]  # typed by the schema
    if steps is not None:
        options.setdefault("train", {})["steps"] = steps
    if out is not None:
        options["out"] = str(out)
    if eval_every is not None:
        options.setdefault("eval", {})["every"] = eval_every
    if seed is not None:
        options["seed"] = seed
    if device is not None:
        options.setdefault("model", {})["device"] = device
    if model is not None:
        options.setdefault("model", {})["pretrained"] = model
    run = run_training(
        preset=preset,
        config_file=config,
        options=options,
        overrides=list(overrides or []) + list(set_ or []),
        resume=resume,
        argv=_command_line(parsed),
        overwrite=overwrite,
    )
    if os.environ.get("RANK", "0") == "0":  # once, not once per process of a launcher
        typer.echo(f"run written to {run} (metrics.jsonl, checkpoints/, eval/)")


def _command_line(parsed: dict) -> list[str]:
    """The command as parsed (not ``sys.argv``, which is another program's when ``apexcli.cli.main``
    is called in-process): ``apex train --opt VALUE ... KEY=VALUE ...``, each part shell-quoted."""
    argv = ["apex", "train"]
    for name in (
        "preset",
        "config",
        "objectives",
        "balance",
        "weights",
        "steps",
        "out",
        "resume",
        "eval_every",
        "seed",
        "device",
        "model",
    ):
        value = parsed.get(name)
        if value is not None:
            argv += ["--" + name.replace("_", "-"), shlex.quote(str(value))]
    if parsed.get("overwrite"):
        argv.append("--overwrite")
    argv += [shlex.quote(o) for o in list(parsed.get("overrides") or []) + list(parsed.get("set_") or [])]
    return argv
