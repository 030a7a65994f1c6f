"""Evaluation during training and `apex eval` on the tiny preset."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from apexcli.eval.evaluator import evaluate_checkpoint, image_grid
from apexcli.runs import RunDir
from apexcli.train import run_training

SMALL = {
    "train": {
        "steps": 4,
        "prompts_per_step": 2,
        "group_size": 2,
        "rollout_batch_size": 4,
        "train_batch_size": 2,
        "checkpoint_every": 0,
    },
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


def _mean_keys(row: dict) -> list[str]:
    return [k for k in row if k.startswith("eval/") and k.endswith("/mean")]


def test_a_checkpoint_file_named_is_the_file_evaluated(two_runs, tmp_path):
    """--checkpoint DIR/x.safetensors evaluated DIR/pytorch_lora_weights.safetensors instead,
    without a word. Here x is a LoRA of zeros (the base model) beside the trained file."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    from apexcli.runs import LORA_FILE

    run, _ = two_runs
    folder = tmp_path / "loras"
    folder.mkdir()
    shutil.copy(run.latest_checkpoint() / LORA_FILE, folder / LORA_FILE)
    with safe_open(str(folder / LORA_FILE), framework="pt") as f:
        zeros, metadata = {k: f.get_tensor(k) * 0 for k in f.keys()}, f.metadata()
    save_file(zeros, str(folder / "zero.safetensors"), metadata=metadata)
    row = evaluate_checkpoint(run.path, str(folder / "zero.safetensors"))
    base = evaluate_checkpoint(run.path, "base")
    trained = evaluate_checkpoint(run.path, str(folder))
    assert all(row[k] == pytest.approx(base[k], rel=1e-4, abs=5e-6) for k in _mean_keys(base))
    assert any(trained[k] != pytest.approx(base[k], rel=1e-4, abs=5e-6) for k in _mean_keys(base))
    # two files of one folder never share an eval folder
    assert row["eval_dir"].endswith("other-loras-zero-step-000000")
    assert trained["eval_dir"].endswith("other-loras-step-000000")


def test_eval_errors_name_its_own_options(two_runs, tmp_path):
    """A seed out of eval.seed's range was already a one-line error; it now names --seed."""
    from apexcli.errors import ApexError

    run, _ = two_runs
    with pytest.raises(ApexError, match="^--checkpoint '.*missing' does not exist"):
        evaluate_checkpoint(run.path, str(tmp_path / "missing"))
    with pytest.raises(ApexError, match=r"^--seed must be in \[0, 4294967295\], got 1180591620717411303424$"):
        evaluate_checkpoint(run.path, seed=2**70)
