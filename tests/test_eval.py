"""Evaluation during training and `apex eval` on the tiny preset."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from apexcli.eval.evaluator import evaluate_checkpoint, image_grid
from apexcli.runs import RunDir
from apexcli.train import run_training

SMALL = {
    "train": {"steps": 4, "prompts_per_step": 2, "group_size": 2, "rollout_batch_size": 4, "train_batch_size": 2, "checkpoint_every": 0},
    "sampling": {"num_steps": 3},
    "eval": {"every": 2, "num_prompts": 3, "num_steps": 3, "batch_size": 2},
    "logging": {"progress": False},
}


def _train(out, **extra):
    options = {**SMALL, "out": str(out), **extra}
    return RunDir(run_training(preset="tiny", options=options, argv=["test"]))


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    a = _train(root / "apex", objectives=["brightness", "contrast"], balance={"strategy": "apex"})
    b = _train(root / "static", objectives=["brightness", "contrast"], balance={"strategy": "static"})
    return a, b


def _eval_rows(run: RunDir) -> list[dict]:
    return [r for r in run.read_metrics().rows if r["kind"] == "eval"]


def test_eval_rows_at_step_zero_every_n_and_the_end(two_runs):
    run, _ = two_runs
    rows = _eval_rows(run)
    assert [r["step"] for r in rows] == [0, 2, 4]
    for r in rows:
        assert set(r) >= {"eval/brightness/mean", "eval/brightness/std", "eval/contrast/mean", "eval/contrast/std"}
        directory = run.eval_dir(r["step"])
        grid = Image.open(directory / "grid.png")
        assert grid.size == (3 * 64, 64)  # 3 prompts of 64 px in one row
        scores = [json.loads(line) for line in (directory / "scores.jsonl").read_text().splitlines()]
        assert len(scores) == 3
        assert abs(sum(s["brightness"] for s in scores) / 3 - r["eval/brightness/mean"]) < 1e-6


def test_step_zero_is_the_same_base_point_for_runs_sharing_seed_and_model(two_runs):
    a, b = (_eval_rows(run)[0] for run in two_runs)
    assert a == b  # same eval noise, same prompts, LoRA B = 0: the base model in both
    later_a, later_b = (_eval_rows(run)[-1] for run in two_runs)
    assert later_a != later_b  # different balancing moved the policies differently


def test_apex_eval_reproduces_the_final_in_training_evaluation(two_runs, tmp_path):
    run, _ = two_runs
    final = _eval_rows(run)[-1]
    row = evaluate_checkpoint(run.path)
    assert row["step"] == final["step"]
    for key, value in final.items():
        if key.startswith("eval/"):
            assert row[key] == pytest.approx(value, rel=1e-4, abs=5e-6)  # float32 rounding of two LoRA paths
    base = evaluate_checkpoint(run.path, "base")
    assert base["eval/brightness/mean"] == pytest.approx(_eval_rows(run)[0]["eval/brightness/mean"], rel=1e-6)


def test_image_grid_tiles_rows_of_columns():
    import torch

    images = torch.zeros(5, 3, 4, 6)
    images[4] = 1.0
    grid = image_grid(images, columns=2)
    assert grid.size == (12, 12)
    assert grid.getpixel((0, 8)) == (255, 255, 255)  # image 4: third row, first column
    assert grid.getpixel((6, 8)) == (255, 255, 255)  # the unused cell stays white
    assert grid.getpixel((0, 0)) == (0, 0, 0)
