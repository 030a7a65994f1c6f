"""Nothing lost, nothing silent: the run directory under fresh starts, overwrites and resumes
(docs/guide/runs.md, "Reliability"); corrupt checkpoints; LoRA files of another model; Ctrl-C; bad paths."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from apexcli.models.lora import resolve_lora_path
from apexcli.runs import LORA_FILE, RunDir
from apexcli.train.checkpoint import CheckpointError, TrainingState, load_training_state, save_checkpoint
from apexcli.train.run_start import clean_interrupted_saves
from helpers import TINY_OVERRIDES, copy_run, error_line, read_metrics, run_cli, train_tiny

OBJ = ("--objectives", "brightness,colorfulness")
EVERY_STEP = ("train.checkpoint_every=1", "train.keep_checkpoints=0")


def _train_cli(out: Path, steps: int, *extra: str):
    return run_cli(
        ["train", "--preset", "tiny", "--steps", str(steps), "--out", str(out), *TINY_OVERRIDES, *OBJ, *extra]
    )


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory) -> Path:
    """A 4-step run with a checkpoint at every step (read-only: tests copy it)."""
    return train_tiny(tmp_path_factory.mktemp("safety") / "run", 4, *OBJ, *EVERY_STEP)


# ---------------------------------------------------------------------------------- item 1


def test_fresh_train_into_an_existing_run_is_refused_then_overwritten(four_steps, tmp_path):
    run = copy_run(four_steps, tmp_path / "run")
    before = (run / "metrics.jsonl").read_bytes()
    line = error_line(_train_cli(run, 1, "--objectives", "brightness,contrast"))
    assert "already holds a run" in line and "--overwrite" in line and "--resume auto" in line
    assert (run / "metrics.jsonl").read_bytes() == before  # nothing touched
    assert RunDir(run).checkpoint_steps() == [1, 2, 3, 4]

    result = _train_cli(run, 1, "--objectives", "brightness,contrast", "--overwrite")
    assert result.code == 0, result.stderr[-2000:]
    assert "deleted the old run's" in result.stderr
    # the old run is gone as a whole: its higher-numbered checkpoints cannot pose as the new run's
    assert RunDir(run).checkpoint_steps() == [1]
    assert resolve_lora_path(run) == run / "checkpoints" / "step-000001"
    assert [r["step"] for r in read_metrics(run)] == [1]
    assert yaml.safe_load((run / "config.yaml").read_text())["objectives"] == ["brightness", "contrast"]
    assert "--overwrite" in (run / "command.txt").read_text().splitlines()[-1]


def test_overwrite_never_deletes_what_resume_reads(four_steps, tmp_path):
    run = copy_run(four_steps, tmp_path / "run")
    assert "give only one" in error_line(_train_cli(run, 5, "--resume", "auto", "--overwrite"))
    line = error_line(_train_cli(run, 5, "--resume", str(run / "checkpoints" / "step-000002"), "--overwrite"))
    assert "would delete" in line
    assert RunDir(run).checkpoint_steps() == [1, 2, 3, 4]


def _fake_state(step: int) -> TrainingState:
    return TrainingState(
        step=step, optimizer={}, lr_scheduler={}, balancer={}, ema=None, rng={"torch": torch.get_rng_state()}
    )


def test_pruning_never_removes_the_checkpoint_just_written(tmp_path):
    run = RunDir(tmp_path / "run")
    for step in (8, 9):  # higher-numbered leftovers
        (run.checkpoint_dir(step)).mkdir(parents=True)
        (run.checkpoint_dir(step) / LORA_FILE).write_bytes(b"x")

    def write_lora(d: Path) -> None:
        save_file({"a": torch.zeros(1)}, str(d / LORA_FILE))

    save_checkpoint(
        run, 2, save_lora=write_lora, save_ema_lora=None, state=_fake_state(2), config_yaml="a: 1\n", keep=1
    )
    assert run.checkpoint_steps() == [2]
    save_checkpoint(
        run, 3, save_lora=write_lora, save_ema_lora=None, state=_fake_state(3), config_yaml="a: 1\n", keep=2
    )
    assert run.checkpoint_steps() == [2, 3]


# ---------------------------------------------------------------------------------- items 2, 3


def test_resume_from_an_older_checkpoint_moves_the_later_ones_aside(four_steps, tmp_path):
    run = copy_run(four_steps, tmp_path / "run")
    old_rows = read_metrics(run)
    result = _train_cli(run, 3, *EVERY_STEP, "--resume", str(run / "checkpoints" / "step-000002"))
    assert result.code == 0, result.stderr[-2000:]
    assert RunDir(run).checkpoint_steps() == [1, 2, 3]
    assert resolve_lora_path(run) == run / "checkpoints" / "step-000003"  # what sample/eval pick up
    (abandoned,) = (run / "checkpoints").glob("abandoned-*-after-step-000002")
    assert sorted(p.name for p in abandoned.glob("step-*")) == ["step-000003", "step-000004"]
    # the abandoned branch's metrics rows are kept beside its checkpoints, not lost
    kept = [json.loads(line) for line in (abandoned / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in kept] == [3, 4] and kept[0]["loss"] == old_rows[2]["loss"]
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    assert str(abandoned) in result.stderr


def test_resume_overrides_are_applied_or_refused_and_the_record_is_true(four_steps, tmp_path):
    run = copy_run(four_steps, tmp_path / "run")
    for override, key in (
        ("lora.alpha=16", "lora.alpha"),
        ("lora.rank=8", "lora.rank"),
        ("model.tiny_seed=3", "model.tiny_seed"),
        ("seed=7", "seed"),
    ):
        line = error_line(_train_cli(run, 5, "--resume", "auto", override))
        assert key in line and "cannot resume" in line, line
    assert yaml.safe_load((run / "config.yaml").read_text())["lora"]["alpha"] == 8  # untouched by the refusals

    result = _train_cli(run, 5, *EVERY_STEP, "--resume", "auto", "train.lr=0.5", "train.adam_beta2=0.9")
    assert result.code == 0, result.stderr[-2000:]
    assert "train.lr: 0.01 -> 0.5" in result.stderr
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert written["train"]["lr"] == 0.5
    assert read_metrics(run)[-1]["lr"] == 0.5  # the optimizer stepped with the recorded lr
    state = torch.load(run / "checkpoints" / "step-000005" / "state" / "optimizer.pt", weights_only=True)
    (group,) = state["param_groups"]
    assert group["lr"] == 0.5 and tuple(group["betas"]) == (0.9, 0.9)


# ---------------------------------------------------------------------------------- item 9


@pytest.mark.parametrize(
    "file, damage",
    [
        ("state/optimizer.pt", b""),
        ("state/trainer.pt", b"garbage, not a torch file"),
        (LORA_FILE, None),  # truncated
        ("config.yaml", b"train: [unclosed\n"),
    ],
)
def test_a_corrupt_checkpoint_names_its_bad_file(four_steps, tmp_path, file, damage):
    ckpt = copy_run(four_steps / "checkpoints" / "step-000004", tmp_path / "step-000004")
    target = ckpt / file
    target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2] if damage is None else damage)
    with pytest.raises(CheckpointError) as info:
        load_training_state(ckpt)
    assert info.value.file == file and file in str(info.value)


def test_resume_names_the_bad_file_and_auto_falls_back_to_the_previous_good_checkpoint(four_steps, tmp_path):
    run = copy_run(four_steps, tmp_path / "run")
    (run / "checkpoints" / "step-000004" / "state" / "optimizer.pt").write_bytes(b"")
    line = error_line(_train_cli(run, 5, "--resume", str(run / "checkpoints" / "step-000004")))
    assert "state/optimizer.pt" in line and "step-000003" in line  # names the culprit, offers the fallback

    result = _train_cli(run, 4, *EVERY_STEP, "--resume", "auto")
    assert result.code == 0, result.stderr[-2000:]
    assert "step-000004: state/optimizer.pt" in result.stderr and "previous good checkpoint" in result.stderr
    assert RunDir(run).checkpoint_steps() == [1, 2, 3, 4]
    # the new step 4 was trained from step 3, equal to the original step 4 (same seed, same state)
    original = torch.load(four_steps / "checkpoints" / "step-000004" / "state" / "optimizer.pt", weights_only=True)
    again = torch.load(run / "checkpoints" / "step-000004" / "state" / "optimizer.pt", weights_only=True)
    assert all(torch.equal(a, b) for a, b in zip(_tensors(original), _tensors(again)))
    (abandoned,) = (run / "checkpoints").glob("abandoned-*")
    assert (abandoned / "step-000004" / "state" / "optimizer.pt").read_bytes() == b""  # moved aside, not deleted


def _tensors(state: dict) -> list[torch.Tensor]:
    return [v for per_param in state["state"].values() for v in per_param.values() if isinstance(v, torch.Tensor)]


# ---------------------------------------------------------------------------------- item 10 (leftovers)


def test_leftovers_of_an_interrupted_save_are_cleaned(tmp_path):
    run = RunDir(tmp_path / "run")
    ckpts = run.checkpoints_dir
    (ckpts / ".step-000004.ab12.tmp" / "state").mkdir(parents=True)  # killed before the rename
    (ckpts / "step-000002").mkdir()
    (ckpts / ".step-000002.old").mkdir()  # re-save killed after its second rename
    (ckpts / ".step-000003.old").mkdir()  # killed between the two renames: the only copy
    (ckpts / ".step-000003.old" / LORA_FILE).write_bytes(b"x")
    (run.path / ".metrics.jsonl.zz.tmp").write_text("half")
    cleaned = clean_interrupted_saves(run)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000002", "step-000003"]
    assert (ckpts / "step-000003" / LORA_FILE).exists()
    assert not (run.path / ".metrics.jsonl.zz.tmp").exists()
    assert len(cleaned) == 4


# ---------------------------------------------------------------------------------- item 4


def test_eval_log_refuses_another_runs_checkpoint(four_steps, tmp_path):
    run = copy_run(four_steps, tmp_path / "rb")
    other = copy_run(four_steps, tmp_path / "other")
    before = (run / "metrics.jsonl").read_bytes()
    line = error_line(run_cli(["eval", str(run), "--checkpoint", str(other / "checkpoints" / "step-000002"), "--log"]))
    assert "--log" in line and "not one of this run's" in line
    assert (run / "metrics.jsonl").read_bytes() == before
    # without --log it evaluates, into a folder that cannot pass for the run's own step 2
    result = run_cli(["eval", str(run), "--checkpoint", str(other / "checkpoints" / "step-000002")])
    assert result.code == 0, result.stderr[-2000:]
    assert (run / "eval" / "other-other-step-000002" / "scores.jsonl").is_file()
    assert not (run / "eval" / "step-000002").exists() and (run / "metrics.jsonl").read_bytes() == before


# ---------------------------------------------------------------------------------- item 5, 10 (--lora)


SAMPLE = ["sample", "--preset", "tiny", "--steps", "2", "--size", "32", "--prompt", "a red apple"]


def test_a_lora_of_another_model_is_an_error_not_a_silent_no_op(tmp_path):
    unet = tmp_path / "unet_lora.safetensors"
    save_file(
        {
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.ones(4, 320),
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.ones(320, 4),
        },
        str(unet),
    )
    line = error_line(run_cli([*SAMPLE, "--out", str(tmp_path / "s1"), "--lora", str(unet)]))
    assert "unet_lora.safetensors" in line and "another model" in line
    assert not (tmp_path / "s1" / "metadata.jsonl").exists()  # nothing recorded as applied

    wrong_size = tmp_path / "big.safetensors"
    save_file(
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(4, 1536),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.ones(1536, 4),
        },
        str(wrong_size),
    )
    assert "does not fit this model" in error_line(
        run_cli([*SAMPLE, "--out", str(tmp_path / "s2"), "--lora", str(wrong_size)])
    )

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00 not safetensors" * 8)
    assert "garbage.safetensors" in error_line(
        run_cli([*SAMPLE, "--out", str(tmp_path / "s3"), "--lora", str(garbage)])
    )
    png = tmp_path / "image.png"
    png.write_bytes(b"\x89PNG")
    line = error_line(run_cli([*SAMPLE, "--out", str(tmp_path / "s4"), "--lora", str(png)]))
    assert "image.png" in line and "not a LoRA" in line and "does not exist" not in line


# ---------------------------------------------------------------------------------- item 7


def test_an_all_nan_objective_is_warned_about(tmp_path, monkeypatch):
    from apexcli.rewards import toy

    monkeypatch.setattr(toy.Contrast, "score", lambda self, batch, prompts: (torch.full((len(batch),), math.nan), {}))
    result = run_cli(
        [
            "train",
            "--preset",
            "tiny",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "run"),
            *TINY_OVERRIDES,
            "--objectives",
            "brightness,contrast",
            "train.checkpoint_every=0",
        ]
    )
    assert result.code == 0, result.stderr[-2000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "'contrast'" in warnings[0] and "never optimised" in warnings[0]


# ---------------------------------------------------------------------------------- item 10


def test_ctrl_c_says_what_happened_and_exits_130(monkeypatch, tmp_path):
    import apexcli.train

    def interrupted(**_):
        raise KeyboardInterrupt

    monkeypatch.setattr(apexcli.train, "run_training", interrupted)
    result = run_cli(["train", "--preset", "tiny", "--out", str(tmp_path / "run")])
    assert result.code == 130
    assert "interrupted" in result.stderr and "--resume auto" in result.stderr


def test_bad_paths_are_one_line_errors(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert "is a file" in error_line(_train_cli(a_file, 1))
    assert "is a file" in error_line(_train_cli(a_file / "sub", 1))
    assert "is a directory" in error_line(run_cli(["train", "--config", str(tmp_path), "--out", str(tmp_path / "r")]))
    latin1 = tmp_path / "prompts.txt"
    latin1.write_bytes("a caf\xe9 sign\n".encode("latin-1"))
    line = error_line(_train_cli(tmp_path / "r", 1, f"prompts.train={latin1}"))
    assert "prompts.txt" in line and "UTF-8" in line and "line 1" in line
    (config := tmp_path / "c.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert "not UTF-8" in error_line(run_cli(["train", "--config", str(config), "--out", str(tmp_path / "r")]))
    assert (run := run_cli(["serve", "-O", "brightness", "--port", "70000"])).code == 2 and "65535" in run.stderr
    assert "is a file" in error_line(run_cli(["sample", "--preset", "tiny", "--prompt", "x", "--out", str(a_file)]))
