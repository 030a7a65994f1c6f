"""How a training run starts in its directory: fresh, overwriting an old run, or resumed.
The guarantees (docs/guide/runs.md, "Reliability"):

- a fresh run never writes into a directory that holds a run (config.yaml, metrics.jsonl,
  checkpoints/ or eval/): it refuses unless ``--overwrite`` (which deletes exactly those) or
  ``--resume``;
- a resume reads its checkpoint in full before any model is loaded; a bad file is named, and
  ``--resume auto`` passes over unreadable checkpoints to the newest good one, with a warning;
- after a resume from step S, the run's newest checkpoint is the one being continued: later
  checkpoints (an abandoned branch, or unreadable ones), their eval folders and the metrics rows
  after S are moved to ``checkpoints/abandoned-<time>-after-step-S/``, never deleted;
- a config value that differs from the checkpoint's is applied or refused as its field declares
  (``setting(..., resume="refuse")`` in config.py), so config.yaml always tells the truth;
- temp files of an interrupted save (``checkpoints/.step-*.tmp``) are removed at the next start.

``plan_start`` only reads (every process runs it); ``prepare_directory`` and ``abandon_after``
write (the main process, once the model is ready).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from apexcli.config import Config
from apexcli.config_upgrade import upgrade_config
from apexcli.errors import ApexError
from apexcli.runs import COMMAND_FILE, CONFIG_FILE, LORA_FILE, MARKER_FILE, METRICS_FILE, RunDir, parse_step_dirname
from apexcli.schema import flatten_dict, iter_fields
from apexcli.train.checkpoint import CheckpointError, TrainingState, load_training_state, read_checkpoint_config

RUN_ENTRIES = (CONFIG_FILE, COMMAND_FILE, METRICS_FILE, "checkpoints", "eval")
"""What apex writes into a run directory; ``--overwrite`` deletes these and nothing else."""


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


class NothingToTrain(Exception):
    """``--resume`` of a run that already reached ``train.steps``: no model is loaded and no
    file is written; the message says how to train further."""


@dataclass
class StartPlan:
    checkpoint: Path | None = None
    """The checkpoint to resume from (None: a fresh start)."""
    state: TrainingState | None = None
    """Its training state, already read and checked."""
    overwrite: list[str] = field(default_factory=list)
    """Entries of an old run that ``prepare_directory`` deletes (``--overwrite``)."""
    skipped: list[str] = field(default_factory=list)
    """Unreadable checkpoints passed over by ``--resume auto``, with the reason."""


# ------------------------------------------------------------------------------------------ reading


def existing_run_entries(run: RunDir) -> list[str]:
    return [name for name in RUN_ENTRIES if (run.path / name).exists()]


def check_out_path(path: Path) -> None:
    """``--out`` must be a directory or creatable as one."""
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                what = "--out" if p == path else f"--out '{path}': its parent"
                raise ApexError(f"{what} '{p}' is a file, not a directory; give a directory for the run")
            break


def ensure_writable(path: Path) -> None:
    """Create ``path`` and write a probe file in it, so a read-only place fails now, not after
    the model has loaded."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ApexError(f"--out '{path}' is not writable ({exc.strerror or exc}); choose another directory") from None


def _step_dirs(run: RunDir) -> list[tuple[int, Path]]:
    """Every ``checkpoints/step-*`` directory, complete or not, newest first. A ``.step-N.old``
    whose ``step-N`` is missing (a re-save killed between its two renames) counts as step N: it
    is the checkpoint, and the next start renames it back, after this decision has used it."""
    if not run.checkpoints_dir.is_dir():
        return []
    found = {}
    for p in run.checkpoints_dir.iterdir():
        if p.is_dir():
            step = parse_step_dirname(p.name)
            if step is not None:
                found[step] = p
    for p in run.checkpoints_dir.glob(".step-*.old"):
        step = parse_step_dirname(p.name[1 : -len(".old")])
        if p.is_dir() and step is not None and step not in found:
            found[step] = p
    return sorted(found.items(), reverse=True)


def _newest_good(run: RunDir, below: int | None = None) -> tuple[Path | None, TrainingState | None, list[str]]:
    """The newest readable checkpoint of ``run`` (older than step ``below`` if given), and the
    unreadable ones passed over on the way."""
    skipped = []
    for step, path in _step_dirs(run):
        if below is not None and step >= below:
            continue
        if not any(path.iterdir()):
            continue  # an empty dir is no checkpoint at all
        try:
            return path, load_training_state(path), skipped
        except CheckpointError as exc:
            skipped.append(f"{path.name}: {exc.file} {exc.reason}")
    return None, None, skipped


def _run_of_checkpoint(path: Path) -> RunDir | None:
    return RunDir(path.parent.parent) if path.parent.name == "checkpoints" else None


def resolve_resume(run: RunDir, resume: str) -> StartPlan:
    """``auto``: the newest readable checkpoint of ``run`` (none: a fresh start); a checkpoint
    dir: that one (ApexError naming its bad file and the previous good one); a run dir: its
    newest readable checkpoint."""
    if resume == "auto":
        checkpoint, state, skipped = _newest_good(run)
        if checkpoint is None and skipped:
            raise ApexError(
                f"no readable checkpoint in {run.checkpoints_dir} ({'; '.join(skipped)}); "
                "start a new run with --overwrite (deletes them) or another --out"
            )
        return StartPlan(checkpoint=checkpoint, state=state, skipped=skipped)
    path = Path(resume)
    if not path.exists():
        raise ApexError(f"--resume '{resume}' does not exist; give a checkpoint dir, a run dir or 'auto'")
    if path.is_dir() and (path / "state").is_dir() or (path / LORA_FILE).is_file():
        try:
            return StartPlan(checkpoint=path, state=load_training_state(path))
        except CheckpointError as exc:
            owner = _run_of_checkpoint(path)
            step = parse_step_dirname(path.name)
            previous = _newest_good(owner, below=step)[0] if owner is not None and step is not None else None
            offer = (
                f"; the previous good checkpoint is {previous} (--resume {previous})"
                if previous
                else "; no older readable checkpoint exists"
            )
            raise ApexError(f"{exc}{offer}") from None
    plan = resolve_resume(RunDir(path), "auto") if path.is_dir() else StartPlan()
    if plan.checkpoint is None:
        raise ApexError(f"--resume '{resume}' is not a checkpoint (no {LORA_FILE} + state/) nor a run with checkpoints")
    return plan


def plan_start(run: RunDir, cfg: Config, *, resume: str | None, overwrite: bool, verbose: bool = True) -> StartPlan:
    """Decide (reading only) how the run starts; raises ApexError for what must not happen.
    ``verbose``: print the warnings (the main process; every process decides the same)."""
    check_out_path(run.path)
    if resume == "auto" and overwrite:
        raise ApexError("--overwrite starts the run in --out over and --resume auto continues it; give only one")
    plan = resolve_resume(run, resume) if resume else StartPlan()
    entries = existing_run_entries(run)
    if resume == "auto" and plan.checkpoint is None and entries:
        raise ApexError(
            f"--resume auto found no checkpoint in '{run.path}', but it holds a run ({', '.join(entries)}); "
            "nothing to continue from. To start that run over pass --overwrite instead of --resume auto; "
            "to keep it, choose another --out"
        )
    if verbose:
        for line in plan.skipped:
            warn(f"checkpoint {line}; passing over it")
    own = plan.checkpoint is not None and _is_inside(plan.checkpoint, run.path)
    if plan.checkpoint is not None:
        if own and overwrite:
            raise ApexError(
                f"--overwrite would delete {plan.checkpoint}, which --resume continues from; drop --overwrite"
            )
        if plan.skipped and verbose:
            warn(f"resuming from the previous good checkpoint {plan.checkpoint}")
        check_resume_config(plan.checkpoint, read_checkpoint_config(plan.checkpoint), cfg, verbose=verbose)
        if plan.state.step > cfg.train.steps:
            raise ApexError(
                f"--steps {cfg.train.steps} is below step {plan.state.step}, where {plan.checkpoint} already is; "
                f"pass --steps above {plan.state.step} to train further"
            )
        if plan.state.step == cfg.train.steps and own:
            raise NothingToTrain(
                f"'{run.path}' is complete at step {plan.state.step} (train.steps); nothing to train, "
                f"nothing written. Pass --steps above {plan.state.step} to train further"
            )
    if entries and not own:
        if not overwrite:
            what = "a new run" if plan.checkpoint is None else f"a run resumed from {plan.checkpoint}"
            raise ApexError(
                f"--out '{run.path}' already holds a run ({', '.join(entries)}); refusing to write {what} over it. "
                "Continue it with --resume auto, choose another --out, or pass --overwrite to delete the old run's files"
            )
        if not run.is_owned():
            raise ApexError(
                f"--overwrite would delete {', '.join(entries)} in '{run.path}', but the folder carries no {MARKER_FILE}: "
                "apex did not write them (or an apex too old to mark its runs did); delete them yourself, or choose another --out"
            )
        plan.overwrite = entries
    return plan


def _is_inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def check_resume_config(checkpoint: Path, saved: dict, cfg: Config, *, verbose: bool = True) -> list[str]:
    """Compare the config with the checkpoint's, field by field. A field declared
    ``resume="refuse"`` must be unchanged (ApexError listing every such key); every other change
    is applied by the trainer and announced. Returns the announced changes."""
    upgraded, dropped = upgrade_config(saved)  # a checkpoint written before keys moved
    old = flatten_dict(upgraded)
    refused, applied = [], list(dropped)
    for key, value, rule in iter_fields(cfg):
        if key not in old or old[key] == value:
            continue
        change = f"{key}: {old[key]!r} -> {value!r}"
        same = rule.resume_key is not None and rule.resume_key(old[key]) == rule.resume_key(value)
        (refused if rule.resume == "refuse" and not same else applied).append(change)
    if refused:
        raise ApexError(
            f"cannot resume from {checkpoint} with these changes: {'; '.join(refused)} (the saved LoRA and state only "
            "make sense with the checkpoint's values); drop them, or start a new run (another --out, or --overwrite)"
        )
    if applied and verbose:
        print(f"resume: applying config changes from the checkpoint's: {'; '.join(applied)}", file=sys.stderr)
    return applied


# ------------------------------------------------------------------------------------------ writing


def prepare_directory(run: RunDir, plan: StartPlan) -> None:
    """Main process: delete an overwritten run's files, then clear an interrupted save's leftovers."""
    if plan.overwrite:
        for name in plan.overwrite:
            target = run.path / name
            shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
        print(f"overwrite: deleted the old run's {', '.join(plan.overwrite)} in {run.path}", file=sys.stderr)
    cleaned = clean_interrupted_saves(run)
    if cleaned:
        print(f"removed leftovers of an interrupted save: {', '.join(cleaned)}", file=sys.stderr)


def clean_interrupted_saves(run: RunDir) -> list[str]:
    """Temp dirs of a save killed before its rename (``.step-N.*.tmp``) are deleted; a
    ``.step-N.old`` (killed between the two renames of a re-save) goes back to ``step-N`` if that
    is missing, else is deleted; a ``.step-N.deleting`` (pruning killed midway) is deleted. Temp
    files of apex's own atomic writes in the run dir (``.config.yaml.*.tmp`` ...) are deleted, and
    nothing else: the folder may hold other files."""
    cleaned = []
    ckpts = run.checkpoints_dir
    if ckpts.is_dir():
        for p in sorted(ckpts.iterdir()):
            if p.name.startswith(".step-") and p.name.endswith((".tmp", ".deleting")):
                shutil.rmtree(p, ignore_errors=True)
                cleaned.append(f"checkpoints/{p.name}")
            elif p.name.startswith(".step-") and p.name.endswith(".old"):
                final = ckpts / p.name[1 : -len(".old")]
                if final.exists():
                    shutil.rmtree(p, ignore_errors=True)
                    cleaned.append(f"checkpoints/{p.name}")
                else:
                    os.replace(p, final)
                    cleaned.append(f"checkpoints/{p.name} (restored as {final.name})")
    if run.path.is_dir():
        for name in (CONFIG_FILE, COMMAND_FILE, METRICS_FILE, MARKER_FILE):
            for p in sorted(run.path.glob(f".{name}.*.tmp")):
                if p.is_file():
                    p.unlink()
                    cleaned.append(p.name)
    return cleaned


def abandon_after(run: RunDir, step: int) -> Path | None:
    """Resumed at ``step``: move the run's later checkpoints and eval folders, with the metrics
    rows after ``step``, to ``checkpoints/abandoned-<time>-after-step-<step>/``, so the newest
    checkpoint is the one continued from. Rows after ``step`` with nothing later saved (a crash
    after the last checkpoint) are simply dropped: the resumed run recomputes them."""
    later = [p for s, p in _step_dirs(run) if s > step]
    metrics = run.read_metrics()
    if metrics.skipped:
        warn(
            f"{run.metrics_path} has {len(metrics.skipped)} line(s) that are not rows ({metrics.skipped[0]}); "
            "kept as they are"
        )
    rows = metrics.rows
    dropped = [r for r in rows if r["step"] > step]
    if not later:
        if dropped:
            run.truncate_metrics_after(step)
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dest = run.checkpoints_dir / f"abandoned-{stamp}-after-step-{step:06d}"
    n = 1
    while dest.exists():
        n += 1
        dest = run.checkpoints_dir / f"abandoned-{stamp}-{n}-after-step-{step:06d}"
    dest.mkdir(parents=True)
    for p in later:
        os.replace(p, dest / p.name)
    evals = []
    eval_root = run.path / "eval"
    if eval_root.is_dir():
        for p in eval_root.iterdir():
            s = parse_step_dirname(p.name)
            if s is not None and s > step:
                (dest / "eval").mkdir(exist_ok=True)
                os.replace(p, dest / "eval" / p.name)
                evals.append(p.name)
    if dropped:
        (dest / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in dropped), encoding="utf-8")
        run.truncate_metrics_after(step)
    warn(
        f"resumed at step {step}: moved the later checkpoints ({', '.join(sorted(p.name for p in later))})"
        + (", their eval folders" if evals else "")
        + (f" and {len(dropped)} metrics rows" if dropped else "")
        + f" to {dest}; delete it when you no longer need them"
    )
    return dest
