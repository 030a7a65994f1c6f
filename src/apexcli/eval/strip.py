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
CAPTION_FONT = 11
CAPTION_LINE = 13  # pixels per caption line under a tile
UP, DOWN, SAME = (0, 130, 0), (200, 0, 0), (110, 110, 110)

TileScores = dict[str, float]  # objective -> finite score of one tile (an objective that does not apply is absent)


@dataclass
class Strip:
    path: Path  # the PNG written
    rows: list[str]  # row labels, top to bottom ("base model", then run names)
    prompts: list[tuple[str, int]]  # (prompt, seed) of each column
    objectives: list[str] = field(default_factory=list)  # scores captioned under the tiles
    warnings: list[str] = field(default_factory=list)


def _tile_scores(row: dict) -> TileScores:
    return {
        k: float(v)
        for k, v in row.items()
        if k not in ("index", "prompt", "seed")
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
        and math.isfinite(v)
    }


def _read_eval(directory: Path) -> tuple[Image.Image, list[tuple[str, int]], list[TileScores]] | None:
    grid, scores = directory / "grid.png", directory / "scores.jsonl"
    if not grid.is_file() or not scores.is_file():
        return None
    try:
        rows = [json.loads(line) for line in scores.read_text(encoding="utf-8").splitlines() if line.strip()]
        keys = [(str(r["prompt"]), int(r["seed"])) for r in rows]
        tile_scores = [_tile_scores(r) for r in rows]
        image = Image.open(grid).convert("RGB")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return image, keys, tile_scores


def _short_names(objectives: list[str]) -> dict[str, str]:
    """Four letters each where that keeps them apart (adhe, qual, appe, ocr), else the full names."""
    short = {name: name[:4] for name in objectives}
    return short if len(set(short.values())) == len(short) else {name: name for name in objectives}


def caption_lines(scores: TileScores, base: TileScores | None, objectives: list[str]) -> list[tuple[str, tuple]]:
    """One (text, colour) line per objective the tile has: the value on the base row
    (``base`` None), else the change from the base tile, coloured by its sign."""
    short = _short_names(objectives)
    lines = []
    for name in objectives:
        if name not in scores:
            continue
        if base is None or name not in base:
            lines.append((f"{short[name]} {scores[name]:.3g}", SAME))
            continue
        delta = scores[name] - base[name]
        colour = UP if delta > 0 else DOWN if delta < 0 else SAME
        lines.append((f"{short[name]} {delta:+.2g}" if delta else f"{short[name]} =", colour))
    return lines


def grid_tiles(grid: Image.Image, n: int) -> list[Image.Image] | None:
    """Split an evaluator grid of ``n`` square tiles back into tiles (column count inferred)."""
    width, height = grid.size
    for cols in [min(MAX_COLUMNS, n)] + list(range(1, n + 1)):
        if width % cols:
            continue
        side = width // cols
        if side and math.ceil(n / cols) * side == height:
            return [
                grid.crop(((i % cols) * side, (i // cols) * side, (i % cols + 1) * side, (i // cols + 1) * side))
                for i in range(n)
            ]
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
    base_grid, base_keys, base_scores = base
    n = min(MAX_COLUMNS, len(base_keys))
    base_tiles = grid_tiles(base_grid, len(base_keys))
    if base_tiles is None or n == 0:
        return None
    rows: list[tuple[str, list[Image.Image], list[TileScores]]] = [("base model", base_tiles[:n], base_scores[:n])]
    for run in runs:
        got = _read_eval(RunDir(run.path).eval_dir(steps.get(run.name, 0)))
        if got is None:
            warnings.append(f"image strip: {run.name} has no readable grid for step {steps.get(run.name)}")
            continue
        grid, keys, scores = got
        if keys[:n] != base_keys[:n]:
            warnings.append(
                f"image strip: {run.name} was evaluated on other prompts or seeds than the base row; left out"
            )
            continue
        tiles = grid_tiles(grid, len(keys))
        if tiles is None:
            warnings.append(f"image strip: cannot split {run.name}'s grid into {len(keys)} tiles; left out")
            continue
        rows.append((f"{run.name} (step {steps[run.name]})", tiles[:n], scores[:n]))
    if len(rows) == 1:
        return None
    objectives = list(dict.fromkeys(name for _, _, scores in rows for tile in scores for name in tile))
    side = base_tiles[0].width
    scale = max(1, math.ceil(MIN_TILE / side))
    tile = side * scale
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=CAPTION_FONT)
    caption_h = CAPTION_LINE * max((len(tile) for _, _, scores in rows for tile in scores), default=0)  # a line a score
    pitch = tile + 4 + caption_h
    label_w = 12 + max(int(font.getlength(label)) for label, _, _ in rows)
    canvas = Image.new("RGB", (label_w + n * (tile + 4), len(rows) * pitch + 20), "white")
    draw = ImageDraw.Draw(canvas)
    for c in range(n):
        draw.text((label_w + c * (tile + 4) + tile // 2, 2), str(c + 1), fill="black", font=font, anchor="mt")
    for r, (label, tiles, scores) in enumerate(rows):
        y = 20 + r * pitch
        draw.text((4, y + tile // 2), label, fill="black", font=font, anchor="lm")
        for c, im in enumerate(tiles):
            x = label_w + c * (tile + 4)
            canvas.paste(im.resize((tile, tile), Image.Resampling.NEAREST), (x, y))
            base_tile = None if r == 0 else rows[0][2][c]
            for i, (text, colour) in enumerate(caption_lines(scores[c], base_tile, objectives)):
                draw.text((x + 2, y + tile + 1 + i * CAPTION_LINE), text, fill=colour, font=small)
    path = Path(out) / STRIP_FILE
    canvas.save(path)
    return Strip(
        path=path, rows=[label for label, _, _ in rows], prompts=base_keys[:n], objectives=objectives, warnings=warnings
    )
