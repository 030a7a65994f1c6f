"""The image strip of ``apex pareto``: the same eval prompts and seeds from the base model and
from each run's final evaluation, side by side, so a person sees what training changed.

Reads only run folders: ``eval/step-XXXXXX/grid.png`` (the evaluator's grid, prompts in order)
and ``scores.jsonl`` next to it (prompt and seed of each tile). The base row is the step-0
grid of the first run that has one; a run whose final eval used other prompts or seeds than
the base row is left out with a warning. One row per model, one column per prompt.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from apexcli.runs import RunDir

STRIP_FILE = "samples.png"
MAX_COLUMNS = 8  # prompts shown
MIN_TILE = 96  # tiles are enlarged (nearest neighbour) to at least this many pixels


@dataclass
class Strip:
    path: Path  # the PNG written
    rows: list[str]  # row labels, top to bottom ("base model", then run names)
    prompts: list[tuple[str, int]]  # (prompt, seed) of each column
    warnings: list[str] = field(default_factory=list)


def _read_eval(directory: Path) -> tuple[Image.Image, list[tuple[str, int]]] | None:
    grid, scores = directory / "grid.png", directory / "scores.jsonl"
    if not grid.is_file() or not scores.is_file():
        return None
    try:
        rows = [json.loads(line) for line in scores.read_text(encoding="utf-8").splitlines() if line.strip()]
        keys = [(str(r["prompt"]), int(r["seed"])) for r in rows]
        image = Image.open(grid).convert("RGB")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return image, keys


def grid_tiles(grid: Image.Image, n: int) -> list[Image.Image] | None:
    """Split an evaluator grid of ``n`` square tiles back into tiles (column count inferred)."""
    width, height = grid.size
    for cols in [min(MAX_COLUMNS, n)] + list(range(1, n + 1)):
        if width % cols:
            continue
        side = width // cols
        if side and math.ceil(n / cols) * side == height:
            return [grid.crop(((i % cols) * side, (i // cols) * side, (i % cols + 1) * side, (i // cols + 1) * side))
                    for i in range(n)]
    return None


def write_strip(runs: list, steps: dict[str, int], out: Path) -> Strip | None:
    """``runs``: RunRecords (path, name, evals); ``steps``: run name -> the step to show.
    Returns None when no base grid or no run grid can be read."""
    warnings: list[str] = []
    base = None
    for run in runs:
        if any(e.step == 0 for e in run.evals):
            base = _read_eval(RunDir(run.path).eval_dir(0))
            if base is not None:
                break
    if base is None:
        return None
    base_grid, base_keys = base
    n = min(MAX_COLUMNS, len(base_keys))
    base_tiles = grid_tiles(base_grid, len(base_keys))
    if base_tiles is None or n == 0:
        return None
    rows: list[tuple[str, list[Image.Image]]] = [("base model", base_tiles[:n])]
    for run in runs:
        got = _read_eval(RunDir(run.path).eval_dir(steps.get(run.name, 0)))
        if got is None:
            warnings.append(f"image strip: {run.name} has no readable grid for step {steps.get(run.name)}")
            continue
        grid, keys = got
        if keys[:n] != base_keys[:n]:
            warnings.append(f"image strip: {run.name} was evaluated on other prompts or seeds than the base row; left out")
            continue
        tiles = grid_tiles(grid, len(keys))
        if tiles is None:
            warnings.append(f"image strip: cannot split {run.name}'s grid into {len(keys)} tiles; left out")
            continue
        rows.append((f"{run.name} (step {steps[run.name]})", tiles[:n]))
    if len(rows) == 1:
        return None
    side = base_tiles[0].width
    scale = max(1, math.ceil(MIN_TILE / side))
    tile = side * scale
    font = ImageFont.load_default(size=14)
    label_w = 12 + max(int(font.getlength(label)) for label, _ in rows)
    canvas = Image.new("RGB", (label_w + n * (tile + 4), len(rows) * (tile + 4) + 20), "white")
    draw = ImageDraw.Draw(canvas)
    for c in range(n):
        draw.text((label_w + c * (tile + 4) + tile // 2, 2), str(c + 1), fill="black", font=font, anchor="mt")
    for r, (label, tiles) in enumerate(rows):
        y = 20 + r * (tile + 4)
        draw.text((4, y + tile // 2), label, fill="black", font=font, anchor="lm")
        for c, im in enumerate(tiles):
            canvas.paste(im.resize((tile, tile), Image.Resampling.NEAREST), (label_w + c * (tile + 4), y))
    path = Path(out) / STRIP_FILE
    canvas.save(path)
    return Strip(path=path, rows=[label for label, _ in rows], prompts=base_keys[:n], warnings=warnings)
