"""`apex score PATH...`: score image files on any rewards (parses options, calls score_paths)."""

from __future__ import annotations

from typing import Annotated

import typer

from apexcli.images import DEFAULT_BATCH_PIXELS, DEFAULT_MAX_PIXELS
from apexcli.rewards.config import RewardsConfig, apply_overrides


def score(
    paths: Annotated[list[str], typer.Argument(help="Image folders, files or globs (quote globs: 'imgs/*.png').")],
    objectives: Annotated[
        str,
        typer.Option(
            "--objectives",
            "-O",
            help="Comma-separated rewards: pick, aes, deqa, ocr, brightness, colorfulness, compressibility, contrast, and the mini world's adherence, quality, appeal; NAME@http://host:port scores NAME on a reward server.",
        ),
    ] = "pick,aes,ocr",
    out: Annotated[
        str,
        typer.Option(
            "--out",
            "-o",
            help="Folder for scores.jsonl and scores.csv (~ is your home); existing ones are kept unless --overwrite.",
        ),
    ] = ".",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace scores.jsonl and scores.csv already in --out.")
    ] = False,
    prompt: Annotated[str | None, typer.Option("--prompt", help="One prompt for every image.")] = None,
    prompts: Annotated[
        str | None,
        typer.Option(
            "--prompts",
            help="A .jsonl or .csv file with 'file' and 'prompt' per image (default: metadata.jsonl beside the images).",
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[
        str,
        typer.Option(
            help="auto = float32 on every device, the dtype training scores in (a reward's own rewards.X.dtype still applies: deqa float16); float16 or bfloat16 for the rewards without one, whose scores then differ from training's."
        ),
    ] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images decoded and scored per step.")] = 32,
    strict: Annotated[bool, typer.Option("--strict", help="Exit non-zero if any input is bad.")] = False,
    trust_remote_code: Annotated[
        bool,
        typer.Option(
            "--trust-remote-code", help="Allow DeQA-Score's own model code to run (rewards.deqa.trust_remote_code)."
        ),
    ] = False,
    max_pixels: Annotated[
        int, typer.Option("--max-pixels", help="Refuse images with more pixels than this (decompression-bomb guard).")
    ] = DEFAULT_MAX_PIXELS,
    max_batch_pixels: Annotated[
        int,
        typer.Option(
            "--max-batch-pixels",
            help="Decoded pixels one scoring batch may hold, read from the headers before decoding: bounds memory (an image larger than this is skipped).",
        ),
    ] = DEFAULT_BATCH_PIXELS,
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="Reward option KEY=VALUE, repeatable, e.g. --set rewards.pick.source=/models/PickScore_v1"
        ),
    ] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Hide the progress bar.")] = False,
) -> None:
    """Score images on rewards; bad files are listed, good ones scored."""
    from apexcli.scoring import score_paths

    config = apply_overrides(RewardsConfig(), list(overrides or []))
    # the --trust-remote-code flag, or the option given as --set rewards.deqa.trust_remote_code=true
    config.deqa.trust_remote_code = config.deqa.trust_remote_code or trust_remote_code
    score_paths(
        paths,
        objectives=objectives,
        out_dir=out,
        prompt=prompt,
        prompts_file=prompts,
        device=device,
        dtype=dtype,
        config=config,
        batch_size=batch_size,
        strict=strict,
        max_pixels=max_pixels,
        max_batch_pixels=max_batch_pixels,
        overwrite=overwrite,
        progress=not no_progress,
    )
