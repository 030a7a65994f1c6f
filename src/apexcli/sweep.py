"""``apex sweep``: the static-weight frontier baseline, one ``apex train`` run per weight vector.

The weight vectors form the simplex lattice with ``points`` points per edge: for K objectives
and H = points - 1 divisions,

    W = { (n_1/H, ..., n_K/H) : n_i in {0..H}, n_1 + ... + n_K = H },   |W| = C(H+K-1, K-1)

(K=2, points=5: 0/1, .25/.75, .5/.5, .75/.25, 1/0; K=3, points=3: 6 vectors). Each vector
becomes one run ``apex train --balance static ... balance.weights=[w_1,...,w_K]`` written to
``<out>/w-<w_1>-...-<w_K>``. Before anything is launched, the objectives and every run's
config (preset, config file, overrides, weights) are resolved and validated as ``apex train``
would, so a mistake is one error instead of |W| failed runs, and a sweep of more than
``max_runs`` runs is refused. Runs are launched one after another with an argv list (no
shell); a failed run is reported and the sweep goes on; the summary names every failure.
"""

from __future__ import annotations

import math
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from apexcli.console import make_console
from apexcli.errors import ApexError

# keys the sweep sets itself; an override may not change them
RESERVED_OVERRIDES = (
    "balance.weights",
    "balance.strategy",
    "objectives",
    "out",
    "name",
)  # one per run: set by the sweep
LABEL_DECIMALS = 4  # decimals of a weight in a run folder name
MAX_RUNS = 200  # default limit on |W|: each run is a whole training run


@dataclass(frozen=True)
class SweepRun:
    """One planned run of the sweep."""

    weights: tuple[float, ...]  # static weights, sum 1
    out: Path  # its run directory
    argv: list[str]  # the train command line, argv[0] == "apex"


@dataclass
class SweepOutcome:
    run: SweepRun
    returncode: int | None  # None: it could not be started (see ``error``)
    seconds: float  # wall time of the run
    error: str = ""  # why it could not start


@dataclass
class SweepResult:
    plan: list[SweepRun]  # every run, in launch order
    outcomes: list[SweepOutcome] = field(default_factory=list)  # empty for --dry-run

    @property
    def failed(self) -> list[SweepOutcome]:
        return [o for o in self.outcomes if o.returncode != 0]


def simplex_lattice(k: int, points: int) -> list[tuple[float, ...]]:
    """The lattice W above, in lexicographic order of (n_1, ..., n_K)."""
    if k < 1 or points < 2:
        raise ValueError("need k >= 1 objectives and points >= 2 per edge")
    h = points - 1

    def compositions(total: int, parts: int):
        if parts == 1:
            yield (total,)
            return
        for first in range(total + 1):
            for rest in compositions(total - first, parts - 1):
                yield (first, *rest)

    return [tuple(n / h for n in comp) for comp in compositions(h, k)]


def sweep_size(k: int, points: int) -> int:
    """|W| = C(H+K-1, K-1) with H = points - 1, without building the lattice."""
    return math.comb(points - 1 + k - 1, k - 1)


def weight_label(weights: Sequence[float]) -> str:
    """Folder name of a weight vector: ``w-0.25-0.75`` (at most LABEL_DECIMALS decimals)."""
    parts = [f"{w:.{LABEL_DECIMALS}f}".rstrip("0").rstrip(".") for w in weights]
    return "w-" + "-".join(parts)


def train_argv(
    weights: Sequence[float],
    objectives: Sequence[str],
    out: Path,
    *,
    preset: str | None = None,
    steps: int | None = None,
    config: Path | None = None,
    overrides: Sequence[str] = (),
    resume: bool = False,
) -> list[str]:
    """The ``apex train`` command line of one static-weight run (options, then KEY=VALUE);
    ``resume`` adds ``--resume auto``: a finished run then only loads, a partial one continues."""
    argv = ["apex", "train"]
    if config is not None:
        argv += ["--config", str(config)]
    if preset is not None:
        argv += ["--preset", preset]
    argv += ["--objectives", ",".join(objectives), "--balance", "static"]
    if steps is not None:
        argv += ["--steps", str(steps)]
    argv += ["--out", str(out)]
    if resume:
        argv += ["--resume", "auto"]
    # repr keeps full precision (1/3 -> 0.3333333333333333), so the weights sum to 1
    argv.append("balance.weights=[" + ",".join(repr(float(w)) for w in weights) + "]")
    argv += list(overrides)
    return argv


def plan_sweep(
    objectives: Sequence[str],
    points: int,
    out: Path,
    *,
    preset: str | None = None,
    steps: int | None = None,
    config: Path | None = None,
    overrides: Sequence[str] = (),
    resume: bool = False,
    max_runs: int = MAX_RUNS,
) -> list[SweepRun]:
    """Validate the options and build every run of the sweep (nothing is launched)."""
    objectives = [o.strip() for o in objectives if o.strip()]
    if len(objectives) < 2:
        raise ApexError(
            f"--objectives {','.join(objectives) or '(empty)'}: a sweep needs at least 2 "
            "objectives, e.g. --objectives brightness,contrast"
        )
    if len(set(objectives)) != len(objectives):
        raise ApexError(f"--objectives {','.join(objectives)} names an objective twice")
    if points < 2:
        raise ApexError(f"--points {points}: need at least 2 points per simplex edge")
    n_runs = sweep_size(len(objectives), points)
    if n_runs > max_runs:
        raise ApexError(
            f"--points {points} with {len(objectives)} objectives makes {n_runs} runs, more than "
            f"--max-runs {max_runs}; use fewer points or raise --max-runs"
        )
    if steps is not None and steps < 1:
        raise ApexError(f"--steps {steps}: need at least 1 training step")
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if "=" not in item or not key:
            raise ApexError(f"override {item!r} is not KEY=VALUE, e.g. -o train.lr=1e-4")
        if key in RESERVED_OVERRIDES:
            raise ApexError(f"override {item!r}: apex sweep sets {key} itself; remove it")
    plan = []
    for weights in simplex_lattice(len(objectives), points):
        run_out = Path(out) / weight_label(weights)
        argv = train_argv(
            weights, objectives, run_out, preset=preset, steps=steps, config=config, overrides=overrides, resume=resume
        )
        plan.append(SweepRun(weights=weights, out=run_out, argv=argv))
    if len({r.out for r in plan}) != len(plan):
        raise ApexError(f"--points {points}: too many points to name runs apart; use fewer")
    return plan


def check_plan(
    plan: Sequence[SweepRun],
    objectives: Sequence[str],
    *,
    preset: str | None = None,
    steps: int | None = None,
    config: Path | None = None,
    overrides: Sequence[str] = (),
) -> None:
    """Resolve and validate every run's config as ``apex train`` does (objective names included),
    without loading a model: an ApexError here means no run would have started."""
    from apexcli.config import resolve_config
    from apexcli.rewards.registry import canonical_name

    for name in objectives:
        canonical_name(name.strip())
    for run in plan:
        options: dict = {
            "objectives": [o.strip() for o in objectives if o.strip()],
            "out": str(run.out),
            "balance": {"strategy": "static", "weights": list(run.weights)},
        }
        if steps is not None:
            options["train"] = {"steps": steps}
        resolve_config(preset=preset, config_file=config, options=options, overrides=list(overrides))


def run_sweep(
    objectives: Sequence[str],
    points: int,
    out: Path,
    *,
    preset: str | None = None,
    steps: int | None = None,
    config: Path | None = None,
    overrides: Sequence[str] = (),
    dry_run: bool = False,
    resume: bool = False,
    max_runs: int = MAX_RUNS,
    executable: Sequence[str] | None = None,
    console: Console | None = None,
) -> SweepResult:
    """Print (``dry_run``) or launch the sweep's runs in order; see the module docstring.

    ``executable`` replaces argv[0] ("apex") when launching; by default the ``apex`` script
    beside this Python, else the one on PATH. Raises ApexError after the summary when any
    run failed.
    """
    console = console or make_console()
    plan = plan_sweep(
        objectives,
        points,
        out,
        preset=preset,
        steps=steps,
        config=config,
        overrides=overrides,
        resume=resume,
        max_runs=max_runs,
    )
    try:
        check_plan(plan, objectives, preset=preset, steps=steps, config=config, overrides=overrides)
    except ApexError as exc:
        raise ApexError(f"sweep not started, every run would fail: {exc}") from None
    result = SweepResult(plan=plan)
    if dry_run:
        for run in plan:
            console.print(escape(shlex.join(run.argv)), highlight=False, soft_wrap=True)
        return result

    prefix = list(executable) if executable is not None else [_apex_executable()]
    for i, run in enumerate(plan, start=1):
        argv = prefix + run.argv[1:]
        console.print(f"[bold][{i}/{len(plan)}][/] {escape(shlex.join(run.argv))}", highlight=False, soft_wrap=True)
        start = time.perf_counter()
        try:
            code: int | None = subprocess.run(argv, check=False).returncode
            error = "" if code == 0 else f"exit status {code}"
        except OSError as exc:  # the executable is missing or not runnable
            code, error = None, f"could not start: {exc}"
        result.outcomes.append(SweepOutcome(run, code, time.perf_counter() - start, error))
        if code != 0:
            console.print(f"[red]run {escape(run.out.name)} failed ({escape(error)}); continuing[/]", highlight=False)

    _print_summary(result, console)
    if result.failed:
        names = ", ".join(o.run.out.name for o in result.failed)
        raise ApexError(
            f"{len(result.failed)} of {len(plan)} sweep runs failed ({names}): see their "
            "output above, fix the cause and rerun those weights"
        )
    return result


def _apex_executable() -> str:
    beside = Path(sys.executable).with_name("apex")
    if beside.is_file():
        return str(beside)
    found = shutil.which("apex")
    if found is None:
        raise ApexError(
            "cannot find the apex executable next to Python or on PATH: install apexcli "
            "(pip install -e .) in this environment"
        )
    return found


def _print_summary(result: SweepResult, console: Console) -> None:
    table = Table(title="apex sweep")
    for col in ("run", "weights", "status", "seconds"):
        table.add_column(col)
    for o in result.outcomes:
        status = "ok" if o.returncode == 0 else f"[red]{escape(o.error)}[/]"
        table.add_row(escape(str(o.run.out)), ",".join(f"{w:.4g}" for w in o.run.weights), status, f"{o.seconds:.1f}")
    console.print(table)
