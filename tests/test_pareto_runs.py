"""apex pareto on hand-made run directories: collection, skips, files written, CLI."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import typer
import yaml
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from apexcli.commands.pareto import pareto as pareto_command
from apexcli.errors import ApexError
from apexcli.eval import plots
from apexcli.eval.collect import build_points, collect_runs
from apexcli.eval.report import run_pareto

OBJS = ("brightness", "contrast")
BASE = (0.5, 0.4)


def make_run(
    root: Path,
    folder: str,
    evals,
    *,
    objectives=OBJS,
    name=None,
    strategy="apex",
    weights=None,
    train_weights=None,
    extra_lines=(),
) -> Path:
    """A run dir: config.yaml + metrics.jsonl with eval rows {step: values} (None = null)."""
    run = root / folder
    run.mkdir(parents=True)
    config = {
        "name": name,
        "objectives": list(objectives),
        "seed": 0,
        "preset": "tiny",
        "balance": {"strategy": strategy, "weights": weights},
        "eval": {"objectives": None},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    lines = []
    for step, values in evals.items():
        if train_weights is not None and step > 0:
            row = {"step": step, "kind": "train", "loss": 0.1}
            row.update({f"balance/weight/{k}": w for k, w in zip(objectives, train_weights(step))})
            lines.append(json.dumps(row))
        row = {"step": step, "kind": "eval"}
        for k, v in zip(objectives, values):
            row[f"eval/{k}/mean"] = v
            row[f"eval/{k}/std"] = 0.01
        lines.append(json.dumps(row))
    lines += list(extra_lines)
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


@pytest.fixture
def three_runs(tmp_path):
    """apex and static on the front, 'bad' below the base everywhere (hand-computed below)."""
    root = tmp_path / "runs"
    make_run(
        root, "apex", {0: BASE, 2: (0.6, 0.5), 4: (0.7, 0.6)}, train_weights=lambda s: (0.5 + 0.05 * s, 0.5 - 0.05 * s)
    )
    make_run(
        root,
        "static",
        {0: BASE, 2: (0.55, 0.45), 4: (0.8, 0.42)},
        strategy="static",
        weights=[0.5, 0.5],
        train_weights=lambda s: (0.5, 0.5),
    )
    make_run(root, "bad", {0: BASE, 2: (0.4, 0.3), 4: (0.45, 0.35)})
    return root


def quiet():
    return Console(file=open("/dev/null", "w"), width=200)


def test_final_points_front_and_hypervolumes(three_runs, tmp_path):
    res = run_pareto([three_runs], tmp_path / "out", normalisation="spread", console=quiet())
    names = [r.name for r in res.table.runs]
    assert names == ["apex", "bad", "static"]  # find_runs order: sorted paths
    hv = dict(zip(names, res.run_hypervolume))
    # spread: brightness 0.8-0.45 = 0.35, contrast 0.6-0.35 = 0.25; base -> origin
    assert hv["apex"] == pytest.approx((0.2 / 0.35) * (0.2 / 0.25))
    assert hv["static"] == pytest.approx((0.3 / 0.35) * (0.02 / 0.25))
    assert hv["bad"] == 0.0
    # union: apex box + the strip of static's box right of apex: 0.45714 + (6/7 - 4/7) * 0.08
    assert res.front_hypervolume == pytest.approx(0.48)
    assert res.on_front.tolist() == [True, False, True]

    data = json.loads((tmp_path / "out" / "pareto.json").read_text())
    assert data["objectives"] == ["brightness", "contrast"]
    assert data["normalisation"]["method"] == "spread"
    assert data["normalisation"]["scale"] == pytest.approx({"brightness": 0.35, "contrast": 0.25})
    assert data["reference"]["values"] == {"brightness": 0.5, "contrast": 0.4}
    assert data["front"]["hypervolume"] == pytest.approx(0.48)
    assert data["front"]["members"] == [{"run": "apex", "step": 4}, {"run": "static", "step": 4}]
    by_name = {r["name"]: r for r in data["runs"]}
    assert by_name["apex"]["hypervolume"] == pytest.approx(0.2 / 0.35 * 0.8)
    assert by_name["bad"]["on_front"] is False
    assert by_name["static"]["weights"] == [0.5, 0.5]
    assert by_name["apex"]["points"][0]["normalised"] == pytest.approx({"brightness": 0.2 / 0.35, "contrast": 0.8})


def test_all_steps_uses_every_trained_eval(three_runs, tmp_path):
    res = run_pareto([three_runs], tmp_path / "out", all_steps=True, normalisation="spread", console=quiet())
    assert res.table.steps.tolist() == [2, 4, 2, 4, 2, 4]
    hv = dict(zip([r.name for r in res.table.runs], res.run_hypervolume))
    # spread over all steps: brightness 0.8-0.4 = 0.4, contrast 0.6-0.3 = 0.3
    assert hv["apex"] == pytest.approx(0.5 * (0.2 / 0.3))  # step 4 dominates step 2
    # static: step 4 box 0.75 x 1/15, plus step 2's part above it: 0.125 x (1/6 - 1/15)
    assert hv["static"] == pytest.approx(0.75 / 15 + 0.125 * (1 / 6 - 1 / 15))
    assert res.front_hypervolume == pytest.approx(1 / 3 + 0.25 / 15)
    assert res.on_front.tolist() == [False, True, False, False, False, True]


def test_plots_written_with_expected_size_and_linked(three_runs, tmp_path):
    out = tmp_path / "out"
    res = run_pareto([three_runs], out, normalisation="spread", console=quiet())
    names = sorted(p.path.name for p in res.plots)
    assert names == ["balance_weights.png", "eval_curves.png", "gains.png", "scatter_matrix.png"]
    dpi = plots.DPI
    expected = {  # (width in, height in) for 2 objectives, from the documented layout
        "scatter_matrix.png": (plots.PANEL_IN + plots.LEGEND_IN, plots.PANEL_IN),
        "eval_curves.png": (2 * plots.PANEL_IN + plots.LEGEND_IN, 0.8 * plots.PANEL_IN),
        "balance_weights.png": (2 * plots.PANEL_IN + plots.LEGEND_IN, 0.8 * plots.PANEL_IN),
        "gains.png": (2 * plots.PANEL_IN / 1.5 + plots.LEGEND_IN, plots.PANEL_IN),
    }
    report = (out / "report.md").read_text()
    for name, (w, h) in expected.items():
        with Image.open(out / name) as img:
            assert img.format == "PNG"
            assert img.size == (round(w * dpi), round(h * dpi))
        assert f"]({name})" in report
    assert "max - min" in report and "| apex | apex | - | 4 |" in report
    assert "Front hypervolume: 0.48" in report


def test_three_objectives_radar_and_no_weights_plot(tmp_path):
    objs = ("a", "b", "c")
    root = tmp_path / "runs"
    make_run(root, "r1", {0: (0, 0, 0), 3: (1, 2, 1)}, objectives=objs)
    make_run(root, "r2", {0: (0, 0, 0), 3: (2, 1, 1)}, objectives=objs)
    make_run(root, "r3", {0: (0, 0, 0), 3: (1, 1, 2)}, objectives=objs)
    res = run_pareto([root], tmp_path / "out", normalisation="none", console=quiet())
    assert res.front_hypervolume == pytest.approx(4.0)  # the 3-D hand value of test_pareto_math
    assert res.run_hypervolume == pytest.approx([2.0, 2.0, 2.0])
    names = sorted(p.path.name for p in res.plots)
    assert names == ["eval_curves.png", "radar.png", "scatter_matrix.png"]  # no weights logged
    with Image.open(tmp_path / "out" / "scatter_matrix.png") as img:
        side = 2 * plots.PANEL_IN
        assert img.size == (round((side + plots.LEGEND_IN) * plots.DPI), round(side * plots.DPI))
    with Image.open(tmp_path / "out" / "radar.png") as img:
        assert img.size == (round((plots.RADAR_IN + plots.LEGEND_IN) * plots.DPI), round(plots.RADAR_IN * plots.DPI))


def test_corrupt_lines_are_warned_and_the_run_kept(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "a", {0: BASE, 2: (0.6, 0.5)}, extra_lines=["{not json", '"just a string"'])
    table = build_points(collect_runs([root]))
    assert [r.name for r in table.runs] == ["a"]
    assert len(table.warnings) == 1
    assert "2 corrupt metrics.jsonl line(s)" in table.warnings[0]
    assert "line 3: not JSON" in table.warnings[0] and "line 4" in table.warnings[0]


def test_unusable_runs_are_skipped_with_reasons(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "good", {0: BASE, 2: (0.6, 0.5)})
    make_run(root, "no-eval", {})  # metrics.jsonl with no rows at all
    train_only = make_run(root, "train-only", {})
    (train_only / "metrics.jsonl").write_text('{"step": 1, "kind": "train", "loss": 0.3}\n')
    make_run(root, "base-only", {0: BASE})
    make_run(root, "null-final", {0: BASE, 2: (0.6, None)})
    bad_cfg = make_run(root, "bad-config", {0: BASE, 2: (0.7, 0.7)})
    (bad_cfg / "config.yaml").write_text("- just\n- a list\n")
    (root / "half").mkdir()
    (root / "half" / "config.yaml").write_text("name: half\n")  # no metrics.jsonl: not a run

    table = build_points(collect_runs([root]))
    assert [r.name for r in table.runs] == ["good"]
    reasons = {s.path.name: s.reason for s in table.skipped}
    assert set(reasons) == {"no-eval", "train-only", "base-only", "null-final", "bad-config"}
    assert "no readable rows" in reasons["no-eval"]
    assert "no eval rows" in reasons["train-only"]
    assert "only the base-model eval" in reasons["base-only"]
    assert reasons["null-final"] == "eval at step 2 has no finite value for contrast"
    assert "config.yaml unreadable" in reasons["bad-config"]

    res = run_pareto([root], tmp_path / "out", console=quiet())
    data = json.loads((tmp_path / "out" / "pareto.json").read_text())
    assert {Path(s["path"]).name for s in data["skipped"]} == set(reasons)
    assert "## Skipped runs" in res.report_path.read_text()


def test_mixed_objective_sets_compare_on_the_common_ones(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "a", {0: (1.0, 2.0), 2: (2.0, 3.0)}, objectives=("contrast", "brightness"))
    make_run(root, "b", {0: (2.0, 1.0, 5.0), 2: (2.5, 1.5, 6.0)}, objectives=("brightness", "contrast", "ocr"))
    table = build_points(collect_runs([root]))
    assert table.objectives == ["contrast", "brightness"]  # the first run's order
    assert table.values.tolist() == [[2.0, 3.0], [1.5, 2.5]]
    assert table.base.tolist() == [1.0, 2.0]
    assert any("different objectives" in w and "ocr" in w for w in table.warnings)

    make_run(tmp_path / "disjoint", "x", {0: (1.0,), 1: (2.0,)}, objectives=("ocr",))
    make_run(tmp_path / "disjoint", "y", {0: (1.0,), 1: (2.0,)}, objectives=("pick",))
    with pytest.raises(ApexError, match="share no eval objective"):
        build_points(collect_runs([tmp_path / "disjoint"]))


def test_base_point_mean_when_runs_disagree_and_fallback_without_step0(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "a", {0: (0.5, 0.4), 2: (0.6, 0.6)})
    make_run(root, "b", {0: (0.7, 0.4), 2: (0.9, 0.5)})
    table = build_points(collect_runs([root]))
    assert table.base == pytest.approx([0.6, 0.4])
    assert any("step-0 (base model) evals differ" in w and "brightness" in w for w in table.warnings)

    no_base = tmp_path / "nobase"
    make_run(no_base, "a", {2: (0.6, 0.6)})
    make_run(no_base, "b", {2: (0.9, 0.5)})
    table = build_points(collect_runs([no_base]))
    assert table.base.tolist() == [0.6, 0.5]  # per-objective minimum of the points
    assert any("no run has a finite step-0" in w for w in table.warnings)


def test_names_fall_back_to_the_folder_and_are_made_unique(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "x", {0: BASE, 1: (0.6, 0.5)}, name="same")
    make_run(root, "y", {0: BASE, 1: (0.6, 0.5)}, name="same")
    make_run(root, "z", {0: BASE, 1: (0.6, 0.5)})
    names = [r.name for r in collect_runs([root]).runs]
    assert names == [f"same ({root / 'x'})", f"same ({root / 'y'})", "z"]
    # duplicate points both sit on the front
    res = run_pareto([root], tmp_path / "out", console=quiet())
    assert res.on_front.tolist() == [True, True, True]


def test_no_runs_is_a_one_line_error(tmp_path):
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    with pytest.raises(ApexError) as err:
        run_pareto([empty], tmp_path / "out", console=quiet())
    msg = str(err.value)
    assert "\n" not in msg
    assert msg == (
        f"no runs found under {empty}: a run is a folder with config.yaml and metrics.jsonl (made by apex train)"
    )
    with pytest.raises(ApexError, match="no runs found under"):
        run_pareto([tmp_path / "missing"], tmp_path / "out", console=quiet())


def test_cli_command(three_runs, tmp_path):
    app = typer.Typer()
    app.command()(pareto_command)
    app.command("noop")(lambda: None)  # two commands so typer keeps the subcommand name
    runner = CliRunner()
    out = tmp_path / "cli-out"
    result = runner.invoke(app, ["pareto", str(three_runs), "--out", str(out), "--all-steps", "--normalize", "spread"])
    assert result.exit_code == 0, result.output
    assert "front hypervolume: 0.35" in result.output
    data = json.loads((out / "pareto.json").read_text())
    assert data["points"] == "every eval step > 0"
    assert np.isclose(data["front"]["hypervolume"], 0.35)

    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["pareto", str(empty), "--out", str(tmp_path / "o2")])
    assert result.exit_code != 0
    assert isinstance(result.exception, ApexError)
    assert str(result.exception).startswith(f"no runs found under {empty}")

    result = runner.invoke(app, ["pareto", str(three_runs), "--normalize", "zscore"])
    assert isinstance(result.exception, ApexError)
    assert "unknown normalisation" in str(result.exception)


def test_a_single_common_objective(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "a", {0: (1.0,), 5: (3.0,)}, objectives=("ocr",))
    make_run(root, "b", {0: (1.0,), 5: (2.0,)}, objectives=("ocr",))
    res = run_pareto([root], tmp_path / "out", normalisation="spread", console=quiet())
    assert res.on_front.tolist() == [True, False]
    # spread 3 - 1 = 2: gains 1 and 0.5; in 1-D the hypervolume is the best gain
    assert res.run_hypervolume == pytest.approx([1.0, 0.5])
    assert res.front_hypervolume == pytest.approx(1.0)
    assert sorted(p.path.name for p in res.plots) == ["eval_curves.png", "gains.png"]


def test_auto_normalisation_uses_the_base_models_eval_std(three_runs, tmp_path):
    """Every step-0 eval carries eval/{k}/std = 0.01, so auto picks base_std: y = (x - base) / 0.01."""
    res = run_pareto([three_runs], tmp_path / "out", console=quiet())
    assert res.normalisation.method == "base_std"
    assert np.allclose(res.normalisation.scale, 0.01)
    expected = (res.table.values - res.table.base) / 0.01
    assert np.allclose(res.normalised, expected)
    data = json.loads((tmp_path / "out" / "pareto.json").read_text())
    assert data["normalisation"]["method"] == "base_std"
    with pytest.raises(ApexError, match="base_std"):
        run_pareto([three_runs], tmp_path / "o2", normalisation="zscore", console=quiet())


def test_a_row_apex_cannot_have_written_costs_itself_not_the_run(tmp_path):
    """One parseable row with a step of 10^30 and Infinity dropped the whole run: its last eval
    had "no finite value". apex writes null for non-finite values and never such a step."""
    root = tmp_path / "runs"
    make_run(
        root,
        "a",
        {0: BASE, 2: (0.6, 0.5)},
        extra_lines=[
            '{"step": 1000000000000000000000000000000, "kind": "eval", "eval/brightness/mean": Infinity, '
            '"eval/contrast/mean": 0.5}',
            '{"step": 3, "kind": "eval", "eval/brightness/mean": NaN, "eval/contrast/mean": 0.5}',
        ],
    )
    make_run(root, "b", {0: BASE, 2: (0.7, 0.4)})
    table = build_points(collect_runs([root]))
    assert [r.name for r in table.runs] == ["a", "b"] and table.skipped == []
    assert table.steps.tolist() == [2, 2] and table.values[0].tolist() == [0.6, 0.5]
    (warning,) = table.warnings
    assert "a: left out 2 metrics row(s) apex cannot have written" in warning
    assert "step 1000000000000000000000000000000 is outside 0..1000000000" in warning
    assert "step 3: eval/brightness/mean is nan (apex writes null)" in warning


def test_an_objective_no_run_has_a_value_for_is_left_out_with_a_note(tmp_path):
    """Eval prompts without quoted text give ocr no value anywhere: every run was refused
    ("no finite value for ocr"); now ocr alone is left out, said in the report and on stderr."""
    root = tmp_path / "runs"
    objectives = ("brightness", "contrast", "ocr")
    make_run(root, "a", {0: (*BASE, None), 2: (0.6, 0.5, None)}, objectives=objectives)
    make_run(root, "b", {0: (*BASE, None), 2: (0.7, 0.4, None)}, objectives=objectives)
    err = io.StringIO()
    res = run_pareto([root], tmp_path / "out", console=quiet(), err_console=Console(file=err, width=200))
    assert res.table.objectives == ["brightness", "contrast"] and len(res.table.runs) == 2
    assert "note: ocr: no finite eval value in any run" in err.getvalue()
    assert "- Left out: ocr: no finite eval value in any run" in res.report_path.read_text()
    assert json.loads(res.json_path.read_text())["left_out"] == res.table.left_out
    make_run(tmp_path / "none", "c", {0: (None,), 2: (None,)}, objectives=("ocr",))
    with pytest.raises(ApexError, match="no objective has a finite eval value in any run"):
        build_points(collect_runs([tmp_path / "none"]))


def test_an_earlier_report_is_kept_unless_overwrite(three_runs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run_pareto([three_runs], out, console=quiet())
    before = (out / "report.md").read_text()
    (out / "report.md").write_text(before + "my notes\n")
    with pytest.raises(ApexError, match="report.md' exists .*pass --overwrite"):
        run_pareto([three_runs], out, console=quiet())
    assert (out / "report.md").read_text().endswith("my notes\n")
    run_pareto([three_runs], out, console=quiet(), overwrite=True)
    assert (out / "report.md").read_text() == before
    # --out=~/x: the home folder, not a folder named ~
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    app = typer.Typer()
    app.command()(pareto_command)
    app.command("noop")(lambda: None)
    result = CliRunner().invoke(app, ["pareto", str(three_runs), "--out=~/report"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "home" / "report" / "report.md").is_file() and not (tmp_path / "~").exists()
