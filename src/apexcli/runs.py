"""The run-directory format, read and written in this one module (docs/guide/runs.md).

<run>/config.yaml            resolved config (``objectives``, ``balance.strategy``, ...)
<run>/command.txt            the command line that started (or resumed) the run
<run>/metrics.jsonl          one JSON object per line; every row has ``step`` and ``kind``
                             ("train": reward/{k}/mean, balance/weight/{k}, loss, ...;
                              "eval": eval/{k}/mean, eval/{k}/std, ...)
<run>/eval/step-000100/      grid.png, scores.jsonl (one row per eval image)
<run>/soup.json              only in mixtures made by ``apex soup``: parents, coefficients
<run>/checkpoints/step-000100/
                             pytorch_lora_weights.safetensors (diffusers format),
                             state/ (optimizer, balancer, RNG, step), config.yaml
<run>/.apex-run.json         the marker: this folder holds an apex run (run id, apex version);
                             ``--overwrite``, ``--resume`` and pruning act only where it is
<run>/.apex-run.lock         an OS lock held by the one process writing the run
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no OS lock, the marker still guards overwrite and resume
    fcntl = None

import yaml

from apexcli.fileio import atomic_directory, atomic_write_text  # noqa: F401  (re-exported for the run folder's users)
from apexcli.jsonsafe import finite_or_none

CONFIG_FILE = "config.yaml"
COMMAND_FILE = "command.txt"
METRICS_FILE = "metrics.jsonl"
LORA_FILE = "pytorch_lora_weights.safetensors"
SOUP_FILE = "soup.json"  # in a run made by ``apex soup``: parents and coefficients of the mixture
MARKER_FILE = ".apex-run.json"
LOCK_FILE = ".apex-run.lock"


def step_dirname(step: int) -> str:
    return f"step-{step:06d}"


def parse_step_dirname(name: str) -> int | None:
    if not name.startswith("step-"):
        return None
    digits = name[len("step-") :]
    return int(digits) if digits.isdigit() else None


def reward_summary(rewards, objectives: list[str], prefix: str) -> dict[str, float]:
    """``{prefix}/{k}/mean`` and ``/std`` (population) of each column of ``rewards`` [N, K] over its
    finite entries (NaN = not applicable is left out; NaN when a column has none)."""
    import torch

    out: dict[str, float] = {}
    for k, name in enumerate(objectives):
        col = rewards[:, k]
        finite = col[torch.isfinite(col)]
        out[f"{prefix}/{name}/mean"] = float(finite.mean()) if finite.numel() else float("nan")
        out[f"{prefix}/{name}/std"] = float(finite.std(unbiased=False)) if finite.numel() else float("nan")
    return out


@dataclass
class MetricsReadResult:
    rows: list[dict]
    skipped: list[str] = field(default_factory=list)  # "line N: reason"


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints_dir / step_dirname(step)

    def eval_dir(self, step: int) -> Path:
        return self.path / "eval" / step_dirname(step)

    def is_run(self) -> bool:
        return self.config_path.is_file() and self.metrics_path.is_file()

    # -- writing ---------------------------------------------------------------------------
    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def write_config(self, config: dict) -> None:
        atomic_write_text(self.config_path, yaml.safe_dump(config, sort_keys=False))

    def append_command(self, argv: list[str]) -> None:
        with open(self.path / COMMAND_FILE, "a", encoding="utf-8") as f:
            f.write(" ".join(argv) + "\n")

    def append_metrics(self, row: dict) -> None:
        if "step" not in row or "kind" not in row:
            raise ValueError("a metrics row needs 'step' and 'kind'")
        line = json.dumps({k: finite_or_none(v) for k, v in row.items()})
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()

    def truncate_metrics_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint so the log matches the weights. A line
        that is not a row (not JSON, no step) is kept where it is: it may be all that is left of
        one, and only its owner can tell."""
        if not self.metrics_path.is_file():
            return
        kept = []
        with open(self.metrics_path, encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                row = _parse_row(line)
                if row is None or row["step"] <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
        text = "".join(kept).encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")
        atomic_write_text(self.metrics_path, text)

    # -- reading ---------------------------------------------------------------------------
    def read_config(self) -> dict:
        with open(self.config_path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
        if not isinstance(data, dict):
            raise ValueError(f"{self.config_path} is not a YAML mapping")
        return data

    def read_metrics(self) -> MetricsReadResult:
        """Rows in file order; corrupt lines are skipped and reported, never fatal."""
        result = MetricsReadResult(rows=[])
        if not self.metrics_path.is_file():
            return result
        with open(self.metrics_path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, start=1):
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    result.skipped.append(f"line {lineno}: not JSON ({exc.msg})")
                    continue
                if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                    result.skipped.append(f"line {lineno}: no integer 'step'")
                    continue
                row.setdefault("kind", "train")
                result.rows.append(row)
        return result

    def checkpoint_steps(self) -> list[int]:
        """Steps with a complete checkpoint (the LoRA file present), ascending."""
        if not self.checkpoints_dir.is_dir():
            return []
        steps = []
        for child in self.checkpoints_dir.iterdir():
            step = parse_step_dirname(child.name)
            if step is not None and (child / LORA_FILE).is_file():
                steps.append(step)
        return sorted(steps)

    def latest_checkpoint(self) -> Path | None:
        steps = self.checkpoint_steps()
        return self.checkpoint_dir(steps[-1]) if steps else None

    # -- ownership -------------------------------------------------------------------------
    @property
    def marker_path(self) -> Path:
        return self.path / MARKER_FILE

    def read_marker(self) -> dict | None:
        """The marker's content, or None when the folder carries none (or an unreadable one)."""
        try:
            data = json.loads(self.marker_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and isinstance(data.get("run_id"), str) else None

    def is_owned(self) -> bool:
        """This folder holds a run apex wrote (its marker is there)."""
        return self.read_marker() is not None

    def write_marker(self) -> dict:
        """Mark the folder as an apex run; an existing marker keeps its run id."""
        from apexcli import __version__

        old = self.read_marker() or {}
        marker = {
            "run_id": old.get("run_id") or uuid.uuid4().hex,
            "apex_version": __version__,
            "created": old.get("created") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        atomic_write_text(self.marker_path, json.dumps(marker, indent=1) + "\n")
        return marker


class RunLock:
    """An exclusive OS lock on ``<run>/.apex-run.lock`` for the life of the writing process.

    ``flock`` is released by the kernel when the process ends, however it ends, so a crash never
    leaves a stale lock; a second writer fails at once, told who holds the folder."""

    def __init__(self, run: RunDir):
        self.path = run.path / LOCK_FILE
        self.run = run
        self._file = None

    def acquire(self) -> RunLock:
        from apexcli.errors import ApexError

        self.run.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = _holder(handle.read())
                handle.close()
                raise ApexError(
                    f"--out '{self.run.path}' is in use by another apex process ({holder}); "
                    "wait for it to end, or choose another --out"
                ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
            )
            + "\n"
        )
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        if self._file is not None:
            if fcntl is not None:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on {info['host']}, since {info['since']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def run_config_of(path: str | Path) -> Path | None:
    """The ``config.yaml`` of the run a LoRA path lies in: the run dir itself, one of its
    checkpoint dirs (``checkpoints/step-N``, its ``ema``), or a LoRA file in one; None elsewhere."""
    p = Path(path).expanduser()
    p = p.parent if p.is_file() else p
    for candidate in (p, *list(p.parents)[:3]):
        run = RunDir(candidate)
        if run.is_run() and (candidate == p or p.is_relative_to(run.checkpoints_dir)):
            return run.config_path
    return None


def find_runs(root: Path) -> list[RunDir]:
    """Every run directory at or under ``root`` (a dir with config.yaml and metrics.jsonl)."""
    root = Path(root)
    candidates = [root] if (root / CONFIG_FILE).is_file() else []
    candidates += sorted(p.parent for p in root.rglob(CONFIG_FILE) if p.parent != root)
    runs = []
    for p in candidates:
        if "checkpoints" in p.relative_to(root).parts:
            continue  # checkpoints carry a config.yaml copy; they are not runs
        run = RunDir(p)
        if run.is_run():
            runs.append(run)
    return runs


def _parse_row(line: str) -> dict | None:
    """A metrics line as a row (a JSON object with an integer ``step``), or None."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) and isinstance(row.get("step"), int) else None
