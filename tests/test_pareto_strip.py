"""apex pareto's image strip: base model and each run on the same eval prompts and seeds."""

import json
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from rich.console import Console

from apexcli.eval.evaluator import image_grid
from apexcli.eval.report import run_pareto
from apexcli.eval.strip import DOWN, SAME, UP, caption_lines, grid_tiles

PROMPTS = [f"prompt {i}" for i in range(10)]


def write_eval(run: Path, step: int, colour: float, prompts=PROMPTS, seeds=None, scores=None) -> None:
    """An eval folder as the evaluator writes it: tile i is a flat grey of level colour + i/100;
    ``scores``: one dict of objective scores per tile."""
    import torch

    d = run / "eval" / f"step-{step:06d}"
    d.mkdir(parents=True)
    tiles = torch.stack([torch.full((3, 16, 16), colour + i / 100) for i in range(len(prompts))])
    image_grid(tiles).save(d / "grid.png")
    seeds = seeds or list(range(len(prompts)))
    scores = scores or [{} for _ in prompts]
    (d / "scores.jsonl").write_text(
        "".join(
            json.dumps({"index": i, "prompt": p, "seed": s, **sc}) + "\n"
            for i, (p, s, sc) in enumerate(zip(prompts, seeds, scores))
        )
    )


def make_run(root: Path, name: str, final: tuple[float, float], colour: float, seeds=None) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(
        yaml.safe_dump(
            {"name": name, "objectives": ["a", "b"], "seed": 0, "balance": {"strategy": name, "weights": None}}
        )
    )
    rows = [
        {"step": s, "kind": "eval", "eval/a/mean": v[0], "eval/b/mean": v[1], "eval/a/std": 0.1, "eval/b/std": 0.1}
        for s, v in ((0, (0.5, 0.5)), (10, final))
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_eval(run, 0, 0.1)
    write_eval(run, 10, colour, seeds=seeds)
    return run


def test_grid_tiles_inverts_the_evaluator_grid():
    import torch

    images = torch.rand(10, 3, 12, 12)
    grid = image_grid(images)  # 8 columns, 2 rows
    tiles = grid_tiles(grid, 10)
    assert len(tiles) == 10
    back = np.asarray(tiles[9], dtype=np.float32) / 255
    assert np.abs(back - images[9].permute(1, 2, 0).numpy()).max() < 1 / 255 + 1e-6


def test_strip_shows_base_and_each_run_and_leaves_out_other_seeds(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "apex", (0.7, 0.6), 0.5)
    make_run(root, "static", (0.8, 0.4), 0.8)
    make_run(root, "reseeded", (0.6, 0.6), 0.3, seeds=[s + 1 for s in range(len(PROMPTS))])
    result = run_pareto([root], tmp_path / "out", console=Console(file=open("/dev/null", "w")))
    strip = result.strip
    assert strip is not None and strip.rows == ["base model", "apex (step 10)", "static (step 10)"]
    assert strip.prompts == [(p, i) for i, p in enumerate(PROMPTS[:8])]
    assert any("reseeded" in w and "seeds" in w for w in result.table.warnings)
    img = np.asarray(Image.open(strip.path).convert("RGB"))
    # three rows of 96-px tiles (16 px x 6); the first tile of each row holds that model's grey level
    row_levels = []
    for r in range(3):
        y = 20 + r * 100 + 48
        row_levels.append(img[y, img.shape[1] - 8 * 100 + 48, 0])
    assert row_levels == [round(0.1 * 255), round(0.5 * 255), round(0.8 * 255)]
    report = result.report_path.read_text()
    assert "![samples](samples.png)" in report and "1. prompt 0 (seed 0)" in report
    assert json.loads(result.json_path.read_text())["samples"]["rows"][0] == "base model"


def test_captions_give_base_values_and_each_runs_change():
    objectives = ["adherence", "quality", "ocr"]
    base = {"adherence": 20.0, "quality": 3.0, "ocr": 0.5}
    assert caption_lines(base, None, objectives) == [("adhe 20", SAME), ("qual 3", SAME), ("ocr 0.5", SAME)]
    run = {"adherence": 21.0, "quality": 3.0, "ocr": 0.25}
    assert caption_lines(run, base, objectives) == [("adhe +1", UP), ("qual =", SAME), ("ocr -0.25", DOWN)]
    # a shapes prompt has no ocr score: no line for it; names that would clash stay whole
    assert caption_lines({"quality": 2.0}, None, objectives) == [("qual 2", SAME)]
    assert [t for t, _ in caption_lines({"ocr_a": 1.0, "ocr_b": 2.0}, None, ["ocr_a", "ocr_b"])] == [
        "ocr_a 1",
        "ocr_b 2",
    ]


def test_strip_captions_each_tile_with_its_scores(tmp_path):
    root = tmp_path / "runs"
    run = root / "apex"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(
        yaml.safe_dump(
            {"name": "apex", "objectives": ["a"], "seed": 0, "balance": {"strategy": "apex", "weights": None}}
        )
    )
    rows = [{"step": s, "kind": "eval", "eval/a/mean": v, "eval/a/std": 0.1} for s, v in ((0, 0.5), (10, 0.6))]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_eval(run, 0, 0.1, scores=[{"a": 0.5, "ocr": None} for _ in PROMPTS])
    write_eval(run, 10, 0.5, scores=[{"a": 0.5 + (0.1 if i == 0 else -0.1), "ocr": None} for i in range(len(PROMPTS))])
    result = run_pareto([root], tmp_path / "out", console=Console(file=open("/dev/null", "w")))
    assert result.strip is not None and result.strip.objectives == ["a"]  # null (not applicable) is no objective
    img = np.asarray(Image.open(result.strip.path).convert("RGB")).astype(int)
    left = img.shape[1] - 8 * 100
    pitch = 100 + 13  # tile + gap + one caption line

    def caption(row: int, col: int) -> np.ndarray:
        y = 20 + row * pitch + 96
        return img[y : y + 13, left + col * 100 : left + col * 100 + 96]

    def has(region: np.ndarray, colour) -> bool:
        return bool((np.abs(region - np.array(colour)).sum(-1) < 60).any())

    assert has(caption(1, 0), UP) and not has(caption(1, 0), DOWN)  # tile 1 scored higher after training
    assert has(caption(1, 1), DOWN) and not has(caption(1, 1), UP)
    assert not has(caption(0, 0), UP) and not has(caption(0, 0), DOWN)  # the base row gives values
    # the tiles themselves sit where they did: row r's first tile holds that model's grey level
    assert img[20 + 48, left + 48, 0] == round(0.1 * 255) and img[20 + pitch + 48, left + 48, 0] == round(0.5 * 255)
