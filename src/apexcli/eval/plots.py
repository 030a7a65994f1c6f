"""PNG plots for ``apex pareto`` (matplotlib, Agg backend: no display needed).

Every figure has a fixed size (``PANEL_IN`` inches per panel plus ``LEGEND_IN`` for the legend
at the right, at ``DPI``), one colour per run (the same colour in every figure) and a legend.
Figures are saved without ``bbox_inches="tight"`` so the pixel size is exactly
``figsize * DPI``; ``constrained`` layout keeps labels inside it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless servers have no display
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

DPI = 120  # pixels per inch of every saved figure
PANEL_IN = 4.0  # inches per subplot side
LEGEND_IN = 2.8  # inches added at the right for the legend
RADAR_IN = 6.0  # inches of the radar chart (square)
CURVE_COLS = 3  # at most this many subplots per row in the curve figures
FONT_SIZE = 10


@dataclass(frozen=True)
class PlotFile:
    path: Path  # the PNG written
    width_px: int  # its size, = figsize * DPI
    height_px: int


@dataclass
class RunSeries:
    """One run's points for the scatter matrix and the radar chart."""

    name: str  # legend label
    color: tuple  # RGBA, shared by every figure
    values: np.ndarray  # [n, K] raw eval means, ascending step
    normalised: np.ndarray  # [n, K] normalised gains (radar chart)
    on_front: np.ndarray  # [n] bool


def run_colors(n: int) -> list[tuple]:
    """n distinct colours: tab10 up to 10 runs, tab20 up to 20, then evenly spaced hues."""
    if n <= 20:
        cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
        return [tuple(cmap(i)) for i in range(n)]  # integer index = the i-th listed colour
    cmap = plt.get_cmap("hsv")
    return [tuple(cmap(i / (n + 1))) for i in range(n)]


def grid_shape(n_panels: int, max_cols: int = CURVE_COLS) -> tuple[int, int]:
    cols = max(1, min(n_panels, max_cols))
    return math.ceil(n_panels / cols), cols


def scatter_matrix(
    path: Path,
    objectives: Sequence[str],
    series: Sequence[RunSeries],
    base: np.ndarray,
) -> PlotFile:
    """Lower-triangle pairwise scatter of raw eval means: panel (i, j) puts objective j on x,
    i on y. Front points get a black ring, the base model a black star; with several points
    per run (``--all-steps``) the run's points are joined in step order."""
    k = len(objectives)
    if k < 2:
        raise ValueError("a scatter matrix needs at least 2 objectives")
    n = k - 1
    fig, axes = _figure(n, n, PANEL_IN * n + LEGEND_IN, PANEL_IN * n)
    pairs = [(i, j) for i in range(1, k) for j in range(k - 1)]
    for i, j in pairs:
        ax = axes[i - 1][j]
        if j >= i:
            ax.set_axis_off()
            continue
        for s in series:
            if len(s.values) > 1:
                ax.plot(s.values[:, j], s.values[:, i], "-", color=s.color, alpha=0.5, lw=1)
            ax.scatter(s.values[:, j], s.values[:, i], color=s.color, s=36, zorder=3)
            front = s.on_front
            ax.scatter(
                s.values[front, j],
                s.values[front, i],
                s=130,
                facecolors="none",
                edgecolors="black",
                linewidths=1.5,
                zorder=4,
            )
        ax.scatter([base[j]], [base[i]], marker="*", s=200, color="black", zorder=5)
        if k == 2:
            _draw_staircase(ax, series)
        ax.set_xlabel(f"{objectives[j]} (eval mean)")
        ax.set_ylabel(f"{objectives[i]} (eval mean)")
        ax.grid(alpha=0.3)
    handles = [_run_handle(s.name, s.color) for s in series] + [
        Line2D([], [], marker="o", ls="", mfc="none", mec="black", mew=1.5, ms=11, label="Pareto front"),
        Line2D([], [], marker="*", ls="", color="black", ms=13, label="base model"),
    ]
    fig.suptitle("Eval means, pairwise (higher is better)")
    return _save(fig, path, handles)


def radar(path: Path, objectives: Sequence[str], series: Sequence[RunSeries]) -> PlotFile:
    """Each run's last point as normalised gains over the base model (dashed circle = 0)."""
    k = len(objectives)
    fig = plt.figure(figsize=(RADAR_IN + LEGEND_IN, RADAR_IN), dpi=DPI, layout="constrained")
    ax = fig.add_subplot(projection="polar")
    angles = np.linspace(0, 2 * np.pi, k, endpoint=False)
    closed = np.append(angles, angles[0])
    values = np.vstack([s.normalised[-1] for s in series]) if series else np.zeros((1, k))
    lo, hi = min(0.0, float(values.min())), max(0.0, float(values.max()))
    pad = 0.1 * (hi - lo) if hi > lo else 0.5
    for s in series:
        v = s.normalised[-1]
        ax.plot(closed, np.append(v, v[0]), "-o", color=s.color, lw=1.8, ms=4)
        ax.fill(closed, np.append(v, v[0]), color=s.color, alpha=0.08)
    ax.plot(np.linspace(0, 2 * np.pi, 200), np.zeros(200), "--", color="black", lw=1)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xticks(angles)
    ax.set_xticklabels(list(objectives))
    ax.set_title("Normalised gain over the base model (dashed = base)")
    handles = [_run_handle(s.name, s.color) for s in series] + [
        Line2D([], [], ls="--", color="black", label="base model")
    ]
    return _save(fig, path, handles)


def gain_bars(path: Path, objectives: Sequence[str], series: Sequence[RunSeries]) -> PlotFile:
    """Each run's last point as normalised gains, grouped bars per objective (0 = base model).
    Used instead of the radar chart below 3 objectives, where a radar degenerates to a line."""
    k = len(objectives)
    fig, axes = _figure(1, 1, PANEL_IN * max(k, 2) / 1.5 + LEGEND_IN, PANEL_IN)
    ax = axes[0][0]
    width = 0.8 / max(len(series), 1)
    for r, s in enumerate(series):
        xs = np.arange(k) - 0.4 + width * (r + 0.5)
        ax.bar(xs, s.normalised[-1], width=width, color=s.color)
    ax.axhline(0.0, color="black", ls="--", lw=1)
    ax.set_xticks(np.arange(k))
    ax.set_xticklabels(list(objectives))
    ax.set_ylabel("normalised gain over the base model")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("Normalised gain over the base model (dashed = base)")
    handles = [_run_handle(s.name, s.color) for s in series] + [
        Line2D([], [], ls="--", color="black", label="base model")
    ]
    return _save(fig, path, handles)


def curves(
    path: Path,
    panels: Sequence[str],
    lines: Sequence[tuple[str, tuple, dict[str, tuple[Sequence[int], Sequence[float]]]]],
    ylabel: str,
    title: str,
) -> PlotFile:
    """One subplot per name in ``panels``; ``lines`` = (run name, colour, {panel: (steps, ys)}).
    Used for per-objective eval curves and for balance weights over steps."""
    rows, cols = grid_shape(len(panels))
    fig, axes = _figure(rows, cols, PANEL_IN * cols + LEGEND_IN, PANEL_IN * 0.8 * rows)
    for idx in range(rows * cols):
        ax = axes[idx // cols][idx % cols]
        if idx >= len(panels):
            ax.set_axis_off()
            continue
        panel = panels[idx]
        for _name, color, data in lines:
            if panel in data and len(data[panel][0]):
                xs, ys = data[panel]
                ax.plot(xs, ys, "-o", color=color, lw=1.6, ms=4)
        ax.set_title(panel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path, [_run_handle(name, color) for name, color, _ in lines])


def _figure(rows: int, cols: int, width: float, height: float):
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), dpi=DPI, squeeze=False, layout="constrained")
    return fig, axes


def _save(fig, path: Path, handles: list) -> PlotFile:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.legend(handles=handles, loc="outside right upper", fontsize=FONT_SIZE - 1, frameon=False)
    fig.savefig(path, dpi=DPI, format="png")
    width, height = fig.get_size_inches()
    plt.close(fig)
    return PlotFile(path=path, width_px=round(width * DPI), height_px=round(height * DPI))


def _run_handle(name: str, color: tuple) -> Line2D:
    label = name if len(name) <= 40 else name[:37] + "..."
    return Line2D([], [], marker="o", color=color, lw=1.6, ms=6, label=label)


def _draw_staircase(ax, series: Sequence[RunSeries]) -> None:
    """In 2-D the front is a staircase: the boundary of the region the front dominates."""
    front = np.vstack([s.values[s.on_front] for s in series if s.on_front.any()]) if series else None
    if front is None or len(front) == 0:
        return
    front = front[np.argsort(-front[:, 0])]  # x descending -> y ascending along the front
    xs, ys = [front[0, 0]], [front[0, 1]]
    for x, y in front[1:]:
        xs += [x, x]
        ys += [ys[-1], y]
    ax.plot(xs, ys, "--", color="grey", lw=1, zorder=2)
