"""Pareto math on eval points: dominance, normalisation, hypervolume. Pure numpy, no I/O.

Conventions (used everywhere in ``apex pareto``):

- every objective is **maximised** (all apex rewards are higher-is-better);
- a point ``a`` *dominates* ``b`` when ``a_k >= b_k`` for every k and ``a_k > b_k`` for one k;
- the *front* (non-dominated set) is every point that no other point dominates. Exact
  duplicates do not dominate each other, so all copies of a front point are on the front;
  a tie in one objective is broken by the others as usual.

Normalisation ``"base_std"`` (the default when the step-0 evals carry stds), per objective k:

    y_k = (x_k - b_k) / sd_k,   sd_k = std of objective k over the eval prompts of the base
                                model (the step-0 eval's ``eval/{k}/std``)

a gain in units of the base model's prompt-to-prompt spread (an effect size). It does not
depend on which runs are compared, so hypervolumes are comparable across invocations, and
noise-level differences stay small instead of being stretched to the full axis.

Normalisation ``"spread"``, per objective k, with b the base model's point:

    y_k = (x_k - b_k) / s_k,    s_k = max_i x_ik - min_i x_ik over the points AND b
                                (s_k = 1 when that spread is 0)

so the base model sits at the origin, a gain of 1 is the full observed range of objective k,
and objectives in different units (PickScore ~22, OCR in [0,1]) weigh the same. Normalisation
``"none"`` uses s_k = 1 (raw gains over the base). Because s_k depends on the compared
points, hypervolumes are comparable within one ``apex pareto`` invocation, not across
invocations with different run sets (use ``"none"`` for that).

Hypervolume: the Lebesgue measure of the region that a set of points dominates and that
dominates the reference point r (the base model, the origin after normalisation):

    HV(P) = vol( union_{p in P, p > r} [r_1, p_1] x ... x [r_K, p_K] )

computed with moocore in its minimisation convention (both points and reference negated).
A point that is not strictly better than r in every objective adds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import moocore
import numpy as np

NORMALISATIONS = ("base_std", "spread", "none")


def dominates(a: np.ndarray, b: np.ndarray) -> bool:
    """True when ``a`` is >= ``b`` everywhere and > somewhere (maximisation)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return bool(np.all(a >= b) and np.any(a > b))


def nondominated_mask(points: np.ndarray) -> np.ndarray:
    """Boolean mask [N] of points that no other point dominates (duplicates all kept).

    Plain O(N^2 K) pairwise test: N is a number of runs or eval steps, never large, and the
    explicit form keeps the duplicate and tie semantics above easy to read.
    """
    pts = _as_points(points)
    n = pts.shape[0]
    if n == 0:
        return np.zeros(0, dtype=bool)
    # ge[i, j, k] = pts[i, k] >= pts[j, k]
    ge = pts[:, None, :] >= pts[None, :, :]
    gt = pts[:, None, :] > pts[None, :, :]
    dominated_by = ge.all(axis=2) & gt.any(axis=2)  # [i, j]: i dominates j
    return ~dominated_by.any(axis=0)


def hypervolume(points: np.ndarray, reference: np.ndarray) -> float:
    """Hypervolume (maximisation) of ``points`` [N, K] above ``reference`` [K]; see module doc."""
    pts = _as_points(points)
    ref = np.asarray(reference, dtype=float).reshape(-1)
    if pts.shape[0] == 0:
        return 0.0
    if pts.shape[1] != ref.shape[0]:
        raise ValueError(f"points have {pts.shape[1]} objectives, reference has {ref.shape[0]}")
    if not np.all(np.isfinite(pts)) or not np.all(np.isfinite(ref)):
        raise ValueError("hypervolume needs finite points and reference")
    better = np.all(pts > ref, axis=1)  # only points strictly above the reference add volume
    if not better.any():
        return 0.0
    return float(moocore.hypervolume(-pts[better], ref=-ref))


@dataclass(frozen=True)
class Normalisation:
    """Per-objective affine map y = (x - base) / scale (see the module docstring)."""

    method: str  # "base_std", "spread" or "none"
    base: np.ndarray  # [K] the base model's raw point; maps to the origin
    scale: np.ndarray  # [K] positive divisor per objective

    def apply(self, points: np.ndarray) -> np.ndarray:
        return (_as_points(points) - self.base) / self.scale

    def describe(self) -> str:
        if self.method == "base_std":
            return (
                "y_k = (x_k - base_k) / sd_k with sd_k the std of objective k over the eval "
                "prompts of the base model (step 0): gains in units of the base model's "
                "prompt-to-prompt spread; all objectives maximised; the base model is the origin "
                "and the hypervolume reference"
            )
        if self.method == "spread":
            return (
                "y_k = (x_k - base_k) / s_k with s_k = max - min of objective k over the "
                "compared points and the base point (s_k = 1 if that is 0); all objectives "
                "maximised; the base model is the origin and the hypervolume reference"
            )
        return (
            "y_k = x_k - base_k (raw gains over the base model, no scaling); all objectives "
            "maximised; the base model is the origin and the hypervolume reference"
        )


def fit_normalisation(
    points: np.ndarray, base: np.ndarray, method: str = "spread", base_std: np.ndarray | None = None
) -> Normalisation:
    """Build the normalisation of ``points`` [N, K] around ``base`` [K] (module docstring);
    ``base_std`` [K] is needed by ``"base_std"`` and must be finite and positive."""
    if method not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {method!r}; choose one of {NORMALISATIONS}")
    pts = _as_points(points)
    base = np.asarray(base, dtype=float).reshape(-1)
    if method == "base_std":
        if not usable_base_std(base_std, len(base)):
            raise ValueError("base_std normalisation needs a finite, positive std per objective")
        scale = np.asarray(base_std, dtype=float).reshape(-1)
    elif method == "none":
        scale = np.ones_like(base)
    else:
        allpts = np.vstack([pts, base[None, :]])
        spread = allpts.max(axis=0) - allpts.min(axis=0)
        scale = np.where(spread > 0, spread, 1.0)
    return Normalisation(method=method, base=base, scale=scale)


def usable_base_std(base_std, k: int) -> bool:
    if base_std is None:
        return False
    sd = np.asarray(base_std, dtype=float).reshape(-1)
    return sd.shape == (k,) and bool(np.all(np.isfinite(sd)) and np.all(sd > 0))


def _as_points(points) -> np.ndarray:
    pts = np.asarray(points, dtype=float)
    if pts.ndim == 1:
        pts = pts[None, :] if pts.size else pts.reshape(0, 0)
    if pts.ndim != 2:
        raise ValueError(f"points must be [N, K], got shape {pts.shape}")
    return pts
