"""The rich progress display of training: phase, step, reward means, ETA."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, *, total: int, start: int, enabled: bool, objectives: list[str]):
        self.enabled = enabled
        self.objectives = objectives
        self.summary = ""
        self._progress = Progress(
            TextColumn("[bold]{task.fields[phase]:<10}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("{task.fields[summary]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            disable=not enabled,
        )
        self._task = self._progress.add_task("train", total=total, completed=start, phase="setup", summary="")

    def __enter__(self):
        self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self._progress.__exit__(*exc)

    def phase(self, name: str, step: int) -> None:
        self._progress.update(self._task, phase=name)

    def advance(self, step: int, row: dict) -> None:
        parts = []
        for k in self.objectives:
            v = row.get(f"reward/{k}/mean")
            w = row.get(f"balance/weight/{k}")
            if v is not None:
                parts.append(f"{k}={v:.3g}" + (f"(w{w:.2f})" if w is not None else ""))
        parts.append(f"kl={row.get('kl', 0.0):.2e}")
        self._progress.update(self._task, completed=step, phase="train", summary=" ".join(parts))
