"""The ``apex`` command line: help texts, and user errors as one line without a traceback."""

from __future__ import annotations

import pytest
import typer

from apexcli.cli import COMMANDS, app
from helpers import run_apex_subprocess, run_cli

VALID_OBJECTIVES = ["brightness", "colorfulness", "compressibility", "contrast"]


def _click_commands() -> dict:
    """Typer's click commands (typer vendors click, so no click import)."""
    return dict(typer.main.get_command(app).commands)


def test_short_options_mean_the_same_in_every_command():
    """-o is --out wherever a command writes somewhere; overrides are --set (or KEY=VALUE), never -o."""
    for name, command in _click_commands().items():
        options = {opt: param for param in command.params for opt in param.opts}
        if "--out" in options:
            assert "-o" in options["--out"].opts, f"apex {name}: --out has no -o"
        assert "-o" not in options or options["-o"] is options.get("--out"), f"apex {name}: -o is not --out"
        assert "--override" not in options, f"apex {name}: overrides are --set"
    for name in ("train", "sample", "score", "serve", "sweep", "doctor"):
        assert "--set" in {opt for param in _click_commands()[name].params for opt in param.opts}, name


def test_top_level_help_lists_every_command():
    result = run_cli(["--help"])
    assert result.code == 0
    for name in COMMANDS:
        assert name in result.stdout
    assert {"train", "sample"} <= set(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_help_documents_every_option(name):
    command = _click_commands()[name]
    result = run_cli([name, "--help"])
    assert result.code == 0, result.stderr
    text = " ".join(result.stdout.split())
    for param in command.params:
        assert param.help, f"apex {name}: {param.name} has no help text"
        if param.param_type_name == "option":
            long_name = max(param.opts, key=len)
            assert long_name in text, f"apex {name} --help does not show {long_name}"
    # the command's own docstring heads its help
    assert command.help and command.help.split(".")[0][:40] in text


def test_unknown_objective_is_one_line_without_traceback():
    proc = run_apex_subprocess(["train", "--preset", "tiny", "--objectives", "nosuch"])
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "'nosuch'" in lines[0]
    for name in VALID_OBJECTIVES:
        assert name in lines[0]


def test_hub_id_offline_is_one_clear_line(tmp_path):
    proc = run_apex_subprocess(
        ["train", "--preset", "tiny", "--model", "someorg/not-a-cached-model", "--out", str(tmp_path / "run")],
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    # names the model and how to point apex at a local copy
    assert "someorg/not-a-cached-model" in lines[0] and "model.pretrained=" in lines[0]


def _one_line_error(argv: list[str]) -> str:
    result = run_cli(argv)
    assert result.code == 2, (result.code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_bad_configs_are_one_line_errors(tmp_path):
    out = ["--out", str(tmp_path / "run")]
    line = _one_line_error(["train", "--preset", "tiny", "train.group_size=3", *out])
    assert "train.rollout_batch_size" in line and "group_size" in line
    line = _one_line_error(["train", "--preset", "tiny", "--model", "/nonexistent", *out])
    assert "/nonexistent" in line and "model_index.json" in line
    line = _one_line_error(["train", "--preset", "tiny", "train.lrr=1", *out])
    assert "'train.lrr'" in line and "train.lr'" in line
    line = _one_line_error(["train", "--preset", "tiny", "--weights", "1,x", *out])
    assert "balance.weights" in line and "'x'" in line
    line = _one_line_error(["train", "--preset", "nosuch", *out])
    assert "nosuch" in line and "tiny" in line
    line = _one_line_error(["train", "--preset", "tiny", "--resume", str(tmp_path / "nothing"), *out])
    assert "--resume" in line
    # a failed setup leaves no half-made run behind
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_sample_errors_are_one_line(tmp_path):
    line = _one_line_error(
        [
            "sample",
            "--preset",
            "tiny",
            "--lora",
            str(tmp_path / "missing"),
            "--prompt",
            "a",
            "--out",
            str(tmp_path / "s"),
        ]
    )
    assert "--lora" in line and "missing" in line
    (tmp_path / "empty_run").mkdir()
    line = _one_line_error(
        [
            "sample",
            "--preset",
            "tiny",
            "--lora",
            str(tmp_path / "empty_run"),
            "--prompt",
            "a",
            "--out",
            str(tmp_path / "s"),
        ]
    )
    assert "checkpoints" in line
    line = _one_line_error(["sample", "--preset", "tiny", "--out", str(tmp_path / "s")])
    assert "--prompt" in line
    for flag in ("--batch-size", "--steps", "--size", "--num-images"):
        line = _one_line_error(["sample", "--preset", "tiny", "--prompt", "a", flag, "0", "--out", str(tmp_path / "s")])
        assert flag in line and "got 0" in line


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_missing_tracker_package_is_an_error_not_silence(tracker, tmp_path):
    import importlib.util

    if importlib.util.find_spec(tracker) is not None:
        pytest.skip(f"{tracker} is installed")
    line = _one_line_error(["train", "--preset", "tiny", f"logging.tracker={tracker}", "--out", str(tmp_path / "run")])
    assert f"logging.tracker={tracker}" in line and "pip install" in line


def test_an_interrupt_wrapped_by_python_is_still_an_interrupt():
    """A Ctrl-C that lands in a ``__set_name__`` while a module imports (torch's dataclasses, on
    the first use of diffusers) reaches the command as a RuntimeError caused by the
    KeyboardInterrupt: it is reported as an interrupt, one line and exit 130, not a traceback;
    any other error still propagates as it is."""
    from apexcli.cli import Interrupted, _guarded

    def wrapped():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:
            raise RuntimeError("Error calling __set_name__ on 'Field' instance") from exc

    with pytest.raises(Interrupted):
        _guarded("train", wrapped)()

    def other():
        raise RuntimeError("a real error")

    with pytest.raises(RuntimeError, match="a real error"):
        _guarded("train", other)()
