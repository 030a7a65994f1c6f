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


def test_apex_eval_on_another_prompt_set_writes_its_own_folder_and_leaves_the_run_alone(tmp_path):
    from apexcli.errors import ApexError
    from apexcli.prompts import load_prompts
    from apexcli.train.sampler import mix_seed

    run = _train(tmp_path / "run", train={**SMALL["train"], "steps": 2, "checkpoint_every": 2})
    metrics_before = run.metrics_path.read_bytes()
    evals_before = sorted(p.name for p in (run.path / "eval").iterdir())
    row = evaluate_checkpoint(run.path, prompts="builtin:ocr_eval", num_prompts=2, seed=7)
    where = run.path / "eval" / "set-ocr_eval-n2-seed7" / "step-000002"
    assert row["eval_dir"] == str(where) and (where / "grid.png").is_file()
    scores = [json.loads(line) for line in (where / "scores.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in scores] == load_prompts("builtin:ocr_eval")[:2]
    assert [s["seed"] for s in scores] == [mix_seed(7, 0), mix_seed(7, 1)]
    assert run.metrics_path.read_bytes() == metrics_before  # never mixed into the run's rows
    assert sorted(p.name for p in (run.path / "eval").iterdir()) == sorted([*evals_before, "set-ocr_eval-n2-seed7"])
    with pytest.raises(ApexError, match="drop --log"):
        evaluate_checkpoint(run.path, seed=7, log=True)
    with pytest.raises(ApexError, match="--num-prompts must be at least 1"):
        evaluate_checkpoint(run.path, num_prompts=0)
