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
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from apexcli.fileio import atomic_directory, atomic_write_text  # noqa: F401  (re-exported for the run folder's users)
from apexcli.jsonsafe import finite_or_none

CONFIG_FILE = "config.yaml"
COMMAND_FILE = "command.txt"
METRICS_FILE = "metrics.jsonl"
LORA_FILE = "pytorch_lora_weights.safetensors"
SOUP_FILE = "soup.json"  # in a run made by ``apex soup``: parents and coefficients of the mixture


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
        """On resume, drop rows logged after the checkpoint so the log matches the weights."""
        if not self.metrics_path.is_file():
            return
        kept = [r for r in self.read_metrics().rows if r["step"] <= step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

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
