"""Pure Pareto math (apexcli.eval.pareto) against hand-computed values."""

import numpy as np
import pytest

from apexcli.eval.pareto import (
    dominates,
    fit_normalisation,
    hypervolume,
    nondominated_mask,
)


def test_dominates_needs_one_strict_improvement():
    assert dominates([2, 1], [1, 1])
    assert not dominates([1, 1], [1, 1])  # equal points do not dominate each other
    assert not dominates([2, 0], [1, 1])  # a trade-off dominates nothing


def test_front_with_ties_and_duplicates():
    points = np.array(
        [
            [3, 1],  # 0 front
            [1, 3],  # 1 front
            [2, 2],  # 2 front
            [1, 1],  # 3 dominated by everything above
            [3, 1],  # 4 duplicate of 0: also on the front
            [2, 1],  # 5 ties 0 on y, worse x -> dominated
            [3, 0],  # 6 ties 0 on x, worse y -> dominated
        ],
        dtype=float,
    )
    assert nondominated_mask(points).tolist() == [True, True, True, False, True, False, False]


def test_front_single_point_identical_points_and_empty():
    assert nondominated_mask(np.array([[0.3, -2.0, 5.0]])).tolist() == [True]
    assert nondominated_mask(np.ones((3, 2))).tolist() == [True, True, True]
    assert nondominated_mask(np.zeros((0, 2))).tolist() == []


def test_front_dominated_everywhere_in_3d():
    points = np.array([[1, 2, 3], [3, 2, 1], [0, 1, 0.5], [2, 2, 2]], dtype=float)
    # [0, 1, 0.5] is below every other point in every objective
    assert nondominated_mask(points).tolist() == [True, True, False, True]


def test_front_is_invariant_to_the_normalisation():
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(20, 3))
    norm = fit_normalisation(raw, raw.mean(axis=0))
    assert nondominated_mask(norm.apply(raw)).tolist() == nondominated_mask(raw).tolist()


def test_hypervolume_2d_by_hand():
    # boxes from the origin: sweep x descending: 3*1 + 2*(2-1) + 1*(3-2) = 6
    pts = np.array([[3, 1], [1, 3], [2, 2]], dtype=float)
    assert hypervolume(pts, np.zeros(2)) == pytest.approx(6.0)
    # a dominated point and a point worse than the reference in one objective add nothing
    more = np.vstack([pts, [[1, 1], [-1, 5], [4, 0]]])
    assert hypervolume(more, np.zeros(2)) == pytest.approx(6.0)
    # a reference that is not the origin: (3,2) above (1,1) -> 2*1
    assert hypervolume(np.array([[3.0, 2.0]]), np.array([1.0, 1.0])) == pytest.approx(2.0)


def test_hypervolume_3d_by_hand():
    ref = np.zeros(3)
    assert hypervolume(np.array([[1.0, 1.0, 1.0]]), ref) == pytest.approx(1.0)
    assert hypervolume(np.array([[2.0, 3.0, 0.5]]), ref) == pytest.approx(3.0)
    # two unit-overlapping 2x1x1 boxes: 2 + 2 - 1
    assert hypervolume(np.array([[2, 1, 1], [1, 2, 1]], dtype=float), ref) == pytest.approx(3.0)
    # three such boxes, inclusion-exclusion: 3*2 - 3*1 + 1 = 4
    three = np.array([[2, 1, 1], [1, 2, 1], [1, 1, 2]], dtype=float)
    assert hypervolume(three, ref) == pytest.approx(4.0)


def test_hypervolume_empty_and_nothing_above_reference():
    assert hypervolume(np.zeros((0, 2)), np.zeros(2)) == 0.0
    assert hypervolume(np.array([[-1.0, -2.0], [0.0, 3.0]]), np.zeros(2)) == 0.0


def test_hypervolume_rejects_bad_input():
    with pytest.raises(ValueError):
        hypervolume(np.ones((2, 3)), np.zeros(2))
    with pytest.raises(ValueError):
        hypervolume(np.array([[np.nan, 1.0]]), np.zeros(2))


def test_spread_normalisation_by_hand():
    points = np.array([[0.7, 0.6], [0.8, 0.42], [0.45, 0.35]])
    base = np.array([0.5, 0.4])
    norm = fit_normalisation(points, base, "spread")
    # s = max - min over points and base: brightness 0.8-0.45, contrast 0.6-0.35
    assert norm.scale == pytest.approx([0.35, 0.25])
    y = norm.apply(points)
    assert y[0] == pytest.approx([0.2 / 0.35, 0.2 / 0.25])
    assert y[2] == pytest.approx([-0.05 / 0.35, -0.05 / 0.25])
    assert norm.apply(base)[0] == pytest.approx([0.0, 0.0])  # base -> origin
    assert "max - min" in norm.describe()


def test_spread_includes_the_base_and_guards_zero_spread():
    # one point: its spread with the base is |x - b|, so the gain is exactly +-1
    norm = fit_normalisation(np.array([[3.0, 1.0]]), np.array([1.0, 2.0]))
    assert norm.apply(np.array([[3.0, 1.0]]))[0] == pytest.approx([1.0, -1.0])
    # an objective where everything equals the base: scale 1, gain 0 (no division by 0)
    flat = fit_normalisation(np.array([[5.0, 2.0], [5.0, 3.0]]), np.array([5.0, 1.0]))
    assert flat.scale == pytest.approx([1.0, 2.0])


def test_none_normalisation_is_the_raw_gain():
    norm = fit_normalisation(np.array([[10.0, 0.3]]), np.array([8.0, 0.1]), "none")
    assert norm.scale.tolist() == [1.0, 1.0]
    assert norm.apply(np.array([[10.0, 0.3]]))[0] == pytest.approx([2.0, 0.2])
    with pytest.raises(ValueError):
        fit_normalisation(np.ones((1, 2)), np.zeros(2), "zscore")


def test_base_std_normalisation_by_hand():
    points = np.array([[3.0, 0.5], [1.0, 0.9]])
    base = np.array([1.0, 0.4])
    norm = fit_normalisation(points, base, "base_std", base_std=np.array([2.0, 0.1]))
    assert np.allclose(norm.apply(points), [[1.0, 1.0], [0.0, 5.0]])
    assert "std" in norm.describe()
    for bad in (None, np.array([2.0, 0.0]), np.array([2.0, np.nan]), np.array([1.0])):
        with pytest.raises(ValueError):
            fit_normalisation(points, base, "base_std", base_std=bad)
