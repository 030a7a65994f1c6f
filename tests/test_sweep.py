"""apex sweep: the simplex lattice, the exact train command lines, sequential launching."""

import json
import math
import sys
from pathlib import Path

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from apexcli.commands.sweep import sweep as sweep_command
from apexcli.errors import ApexError
from apexcli.sweep import plan_sweep, run_sweep, simplex_lattice, train_argv, weight_label


def quiet():
    return Console(file=open("/dev/null", "w"), width=200)


@pytest.mark.parametrize("k,points", [(2, 2), (2, 5), (3, 3), (3, 5), (4, 4), (5, 3)])
def test_lattice_count_sum_and_grid(k, points):
    lattice = simplex_lattice(k, points)
    h = points - 1
    assert len(lattice) == math.comb(h + k - 1, k - 1)
    assert len(set(lattice)) == len(lattice)
    for w in lattice:
        assert len(w) == k
        assert math.isclose(sum(w), 1.0, abs_tol=1e-12)
        assert all(0.0 <= x <= 1.0 for x in w)
        assert all(math.isclose(x * h, round(x * h), abs_tol=1e-9) for x in w)


def test_lattice_by_hand():
    assert simplex_lattice(2, 5) == [(0, 1), (0.25, 0.75), (0.5, 0.5), (0.75, 0.25), (1, 0)]
    assert simplex_lattice(3, 3) == [(0, 0, 1), (0, 0.5, 0.5), (0, 1, 0), (0.5, 0, 0.5), (0.5, 0.5, 0), (1, 0, 0)]


def test_weight_labels():
    assert weight_label((0.25, 0.75)) == "w-0.25-0.75"
    assert weight_label((1.0, 0.0)) == "w-1-0"
    assert weight_label((1 / 3, 1 / 3, 1 / 3)) == "w-0.3333-0.3333-0.3333"


def test_dry_run_argv_exact(tmp_path):
    plan = plan_sweep(
        ["brightness", "contrast"],
        5,
        tmp_path / "sweep",
        preset="tiny",
        steps=4,
        overrides=["train.lr=1e-4", "eval.eval_every=2"],
    )
    assert [r.out.name for r in plan] == ["w-0-1", "w-0.25-0.75", "w-0.5-0.5", "w-0.75-0.25", "w-1-0"]
    assert plan[1].argv == [
        "apex",
        "train",
        "--preset",
        "tiny",
        "--objectives",
        "brightness,contrast",
        "--balance",
        "static",
        "--steps",
        "4",
        "--out",
        str(tmp_path / "sweep" / "w-0.25-0.75"),
        "balance.weights=[0.25,0.75]",
        "train.lr=1e-4",
        "eval.eval_every=2",
    ]
    # no preset/steps given: those options are left to apex train; a config file is passed on
    thirds = plan_sweep(["a", "b", "c"], 4, Path("s"), config=Path("my.yaml"))
    assert thirds[5].argv == [  # n = (1,1,1): after the four with n_1 = 0 and (1,0,2)
        "apex",
        "train",
        "--config",
        "my.yaml",
        "--objectives",
        "a,b,c",
        "--balance",
        "static",
        "--out",
        str(Path("s") / "w-0.3333-0.3333-0.3333"),
        f"balance.weights=[{1 / 3!r},{1 / 3!r},{1 / 3!r}]",
    ]


def test_dry_run_launches_nothing(tmp_path):
    result = run_sweep(
        ["brightness", "contrast"], 3, tmp_path / "s", dry_run=True, executable=["/nonexistent"], console=quiet()
    )
    assert len(result.plan) == 3 and result.outcomes == []
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "objectives,points,overrides,match",
    [
        (["a"], 5, [], "at least 2 objectives"),
        (["a", "a"], 5, [], "twice"),
        (["a", "b"], 1, [], "at least 2 points"),
        (["a", "b"], 3, ["lr"], "not KEY=VALUE"),
        (["a", "b"], 3, ["balance.weights=[1,0]"], "sets balance.weights itself"),
    ],
)
def test_invalid_options_are_one_line_errors(objectives, points, overrides, match):
    with pytest.raises(ApexError, match=match) as err:
        plan_sweep(objectives, points, Path("s"), overrides=overrides)
    assert "\n" not in str(err.value)


FAKE_TRAIN = """
import json, sys
from pathlib import Path
args = sys.argv[1:]
out = Path(args[args.index("--out") + 1])
out.mkdir(parents=True)
with open(out.parent / "order.txt", "a") as f:
    f.write(out.name + "\\n")
(out / "argv.json").write_text(json.dumps(args))
sys.exit(3 if out.name == "w-0.5-0.5" else 0)
"""


def test_launch_is_sequential_and_continues_past_a_failure(tmp_path):
    script = tmp_path / "fake_apex.py"
    script.write_text(FAKE_TRAIN)
    out = tmp_path / "sweep"
    with pytest.raises(ApexError) as err:
        run_sweep(
            ["brightness", "contrast"],
            3,
            out,
            steps=2,
            overrides=["seed=1"],
            executable=[sys.executable, str(script)],
            console=quiet(),
        )
    assert str(err.value).startswith("1 of 3 sweep runs failed (w-0.5-0.5)")
    # all three ran, in lattice order, one after another
    assert (out / "order.txt").read_text().split() == ["w-0-1", "w-0.5-0.5", "w-1-0"]
    args = json.loads((out / "w-1-0" / "argv.json").read_text())
    assert args == [
        "train",
        "--objectives",
        "brightness,contrast",
        "--balance",
        "static",
        "--steps",
        "2",
        "--out",
        str(out / "w-1-0"),
        "balance.weights=[1.0,0.0]",
        "seed=1",
    ]


def test_launch_all_ok_and_unstartable_executable(tmp_path):
    script = tmp_path / "ok.py"
    script.write_text("import sys; sys.exit(0)\n")
    result = run_sweep(
        ["brightness", "contrast"], 2, tmp_path / "s", executable=[sys.executable, str(script)], console=quiet()
    )
    assert [o.returncode for o in result.outcomes] == [0, 0] and result.failed == []

    with pytest.raises(ApexError, match="2 of 2 sweep runs failed"):
        run_sweep(
            ["brightness", "contrast"], 2, tmp_path / "s2", executable=[str(tmp_path / "no-such-apex")], console=quiet()
        )


def test_cli_dry_run_prints_the_command_lines(tmp_path):
    app = typer.Typer()
    app.command()(sweep_command)
    app.command("noop")(lambda: None)  # two commands so typer keeps the subcommand name
    out = tmp_path / "sw"
    result = CliRunner().invoke(
        app,
        [
            "sweep",
            "--objectives",
            "brightness,contrast",
            "--points",
            "3",
            "-o",
            str(out),
            "--preset",
            "tiny",
            "--steps",
            "4",
            "--set",
            "train.lr=1e-4",
            "--dry-run",
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        f"apex train --preset tiny --objectives brightness,contrast --balance static --steps 4 "
        f"--out {out / name} 'balance.weights=[{w}]' train.lr=1e-4"
        for name, w in [("w-0-1", "0.0,1.0"), ("w-0.5-0.5", "0.5,0.5"), ("w-1-0", "1.0,0.0")]
    ]


def test_resume_continues_every_run_from_its_newest_checkpoint():
    argv = train_argv([0.5, 0.5], ["a", "b"], Path("s/w-0.5-0.5"), preset="tiny", resume=True)
    assert argv[argv.index("--resume") + 1] == "auto"
    assert "--resume" not in train_argv([0.5, 0.5], ["a", "b"], Path("s/w"), preset="tiny")


@pytest.mark.parametrize(
    "objectives,kwargs,match",
    [
        (["brightness", "nosuch"], {}, "unknown objective 'nosuch'"),
        (["brightness", "contrast"], {"preset": "nosuch"}, "unknown preset 'nosuch'"),
        (["brightness", "contrast"], {"config": Path("/nonexistent/sweep.yaml")}, "does not exist"),
        (["brightness", "contrast"], {"overrides": ["train.lr=-1"]}, "train.lr"),
        (["brightness", "contrast"], {"overrides": ["train.no_such_key=1"]}, "no_such_key"),
        (["brightness", "contrast"], {"overrides": ["train.group_size=lots"]}, "group_size"),
    ],
)
def test_invalid_config_fails_once_before_any_run(tmp_path, objectives, kwargs, match):
    script = tmp_path / "fake_apex.py"
    script.write_text(FAKE_TRAIN)
    out = tmp_path / "sweep"
    for dry_run in (False, True):
        with pytest.raises(ApexError, match=match) as err:
            run_sweep(
                objectives,
                3,
                out,
                preset=kwargs.get("preset", "tiny"),
                config=kwargs.get("config"),
                overrides=kwargs.get("overrides", ()),
                dry_run=dry_run,
                executable=[sys.executable, str(script)],
                console=quiet(),
            )
        assert str(err.value).startswith("sweep not started") and "\n" not in str(err.value)
    assert not out.exists()  # no child ran


def test_run_count_is_limited_before_the_lattice_is_built():
    with pytest.raises(ApexError, match="--points 1000 with 3 objectives makes 500500 runs, more than --max-runs 200"):
        plan_sweep(["a", "b", "c"], 1000, Path("s"))
    with pytest.raises(ApexError, match="makes"):  # astronomically many: refused at once, nothing enumerated
        plan_sweep([f"o{i}" for i in range(12)], 10_000, Path("s"))
    assert len(plan_sweep(["a", "b"], 200, Path("s"))) == 200  # the limit itself is allowed
    assert len(plan_sweep(["a", "b", "c"], 21, Path("s"), max_runs=231)) == 231


def test_cli_refuses_too_many_points(tmp_path):
    app = typer.Typer()
    app.command()(sweep_command)
    app.command("noop")(lambda: None)
    result = CliRunner().invoke(
        app,
        [
            "sweep",
            "--objectives",
            "brightness,contrast,colorfulness",
            "--points",
            "1000",
            "--out",
            str(tmp_path / "sw"),
            "--dry-run",
        ],
    )
    assert isinstance(result.exception, ApexError) and "--max-runs" in str(result.exception)
    assert result.output == ""  # not one command line printed


def test_an_override_that_would_send_every_run_to_one_folder_is_refused(tmp_path):
    # `-o out=X` made every weight's run write to X: one run existed, each reported ok
    from apexcli.errors import ApexError
    from apexcli.sweep import plan_sweep

    for item in ("out=elsewhere", "objectives=[brightness]", "name=same"):
        with pytest.raises(ApexError, match="apex sweep sets"):
            plan_sweep(["brightness", "contrast"], 2, tmp_path, preset="tiny", overrides=[item])
