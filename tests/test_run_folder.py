"""A run folder is owned: a marker says apex wrote it, an OS lock keeps a second writer out, and
``--overwrite``, ``--resume`` and cleaning act only on what apex made (docs/guide/runs.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from apexcli.runs import MARKER_FILE, RunDir
from helpers import TINY_OVERRIDES, copy_run, error_line, read_metrics, run_cli, train_tiny

OBJ = ("--objectives", "brightness,colorfulness")


def _train_cli(out: Path, steps: int, *extra: str):
    return run_cli(
        ["train", "--preset", "tiny", "--steps", str(steps), "--out", str(out), *TINY_OVERRIDES, *OBJ, *extra]
    )


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory) -> Path:
    """A finished 2-step run with checkpoints at both steps (read-only: tests copy it)."""
    return train_tiny(
        tmp_path_factory.mktemp("folder") / "run", 2, *OBJ, "train.checkpoint_every=1", "train.keep_checkpoints=0"
    )


def test_a_run_carries_its_marker_and_keeps_its_id_across_a_resume(two_steps, tmp_path):
    run = copy_run(two_steps, tmp_path / "run")
    marker = json.loads((run / MARKER_FILE).read_text())
    assert len(marker["run_id"]) == 32 and marker["apex_version"]
    assert _train_cli(run, 3, "--resume", "auto").code == 0
    assert json.loads((run / MARKER_FILE).read_text())["run_id"] == marker["run_id"]


def test_resume_auto_on_a_run_without_a_checkpoint_is_refused_and_touches_nothing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 1\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "kind": "train"}\n')
    (run / "eval").mkdir()
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    line = error_line(_train_cli(run, 1, "--resume", "auto"))
    assert "found no checkpoint" in line and "--overwrite" in line and "another --out" in line
    assert {name: (run / name).read_bytes() for name in before} == before
    # an empty or new folder is a fresh start
    assert _train_cli(tmp_path / "new", 1, "--resume", "auto").code == 0


def test_overwrite_deletes_only_a_folder_apex_marked_as_its_own(two_steps, tmp_path):
    run = copy_run(two_steps, tmp_path / "run")
    (run / MARKER_FILE).unlink()  # a folder of config.yaml, eval/ ... that apex did not mark
    line = error_line(_train_cli(run, 1, "--overwrite"))
    assert "carries no .apex-run.json" in line and "delete them yourself" in line
    assert RunDir(run).checkpoint_steps() == [1, 2]


def test_a_second_writer_is_refused_at_once_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom pathlib import Path\nfrom apexcli.runs import RunDir, RunLock\n"
            "lock = RunLock(RunDir(Path(sys.argv[1]))).acquire()\nprint('held', flush=True)\ntime.sleep(600)\n",
            str(run),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        line = error_line(_train_cli(run, 1))
        assert f"in use by another apex process (pid {holder.pid} on " in line
        assert not (run / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    assert _train_cli(run, 1).code == 0  # the lock died with its process


def test_a_start_deletes_only_apexs_own_temp_files(two_steps, tmp_path):
    run = copy_run(two_steps, tmp_path / "run")
    own = run / ".metrics.jsonl.abc123.tmp"
    theirs = run / ".notes.tmp"
    own.write_text("half a write")
    theirs.write_text("a user's file")
    assert _train_cli(run, 3, "--resume", "auto").code == 0
    assert not own.exists() and theirs.read_text() == "a user's file"


def test_a_resume_with_nothing_to_train_writes_nothing(two_steps, tmp_path):
    run = copy_run(two_steps, tmp_path / "run")
    before = {name: (run / name).read_bytes() for name in ("config.yaml", "command.txt", "metrics.jsonl")}
    result = _train_cli(run, 2, "--resume", "auto")
    assert result.code == 0 and "complete at step 2" in result.stderr and "--steps above 2" in result.stderr
    assert {name: (run / name).read_bytes() for name in before} == before
    line = error_line(_train_cli(run, 1, "--resume", "auto"))
    assert "--steps 1 is below step 2" in line


def test_a_checkpoint_left_between_the_two_renames_of_a_re_save_is_resumed_from(two_steps, tmp_path):
    # killed after step-2 became .step-2.old and before the new step-2 landed
    run = copy_run(two_steps, tmp_path / "run")
    ckpts = run / "checkpoints"
    os.replace(ckpts / "step-000002", ckpts / ".step-000002.old")
    result = _train_cli(run, 3, "--resume", "auto", "train.checkpoint_every=1", "train.keep_checkpoints=0")
    assert result.code == 0, result.stderr[-2000:]
    assert "at step 2" in result.stderr and "abandoned" not in result.stderr
    assert RunDir(run).checkpoint_steps() == [1, 2, 3] and not (ckpts / ".step-000002.old").exists()
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]


@pytest.mark.parametrize("delay", [0.2, 0.8, 2.0])
def test_ctrl_c_at_any_moment_of_a_start_is_one_line_and_exit_130(tmp_path, delay):
    # while the command line imports (the first second), while the models load, while it trains
    import signal

    from helpers import APEX_BIN, HANG_GUARD_S

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            str(APEX_BIN),
            "train",
            "--preset",
            "tiny",
            "--out",
            str(tmp_path / "run"),
            "logging.progress=false",
            "eval.every=0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=HANG_GUARD_S)
    if proc.returncode == 0:
        pytest.skip("the run finished before the interrupt")  # a fast machine; nothing to check
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("interrupted: ")


def test_a_resume_keeps_metrics_lines_that_are_not_rows_and_says_so(two_steps, tmp_path):
    run = copy_run(two_steps, tmp_path / "run")
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 2, "kind": "train", "loss": 0.1\n')  # half a row, cut by a kill
    result = _train_cli(run, 3, "--resume", "auto", "train.checkpoint_every=1", "train.keep_checkpoints=0")
    assert result.code == 0 and "line(s) that are not rows" in result.stderr and "kept as they are" in result.stderr
    assert '{"step": 2, "kind": "train", "loss": 0.1\n' in (run / "metrics.jsonl").read_text()


def test_pruning_goes_through_a_rename_and_clears_step_folders_without_a_lora(two_steps, tmp_path):
    run = copy_run(two_steps, tmp_path / "run")
    broken = run / "checkpoints" / "step-000000"  # a delete killed midway, before deletes renamed first
    (broken / "state").mkdir(parents=True)
    result = _train_cli(run, 4, "--resume", "auto", "train.checkpoint_every=1", "train.keep_checkpoints=2")
    assert result.code == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000003", "step-000004"]


@pytest.mark.parametrize(
    "failure", [OSError(28, "No space left on device"), RuntimeError("PytorchStreamWriter failed writing file")]
)
def test_a_full_disk_names_the_checkpoint_it_could_not_write_and_keeps_the_last_one(
    two_steps, tmp_path, monkeypatch, failure
):
    import apexcli.train.checkpoint as checkpoint_module

    run = copy_run(two_steps, tmp_path / "run")

    def full_disk(*args, **kwargs):
        raise failure

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk)
    line = error_line(_train_cli(run, 3, "--resume", "auto", "train.checkpoint_every=1", "train.keep_checkpoints=0"))
    assert "checkpoints/step-000003" in line
    assert RunDir(run).checkpoint_steps() == [1, 2]  # the last good one is intact; nothing half-written remains
    assert not any(p.name.endswith(".tmp") for p in (run / "checkpoints").iterdir())
