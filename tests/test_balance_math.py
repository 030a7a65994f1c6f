"""Pure balance math on hand-computed tensors: group statistics, P³ terms, min-norm, the probe."""

from __future__ import annotations

import math

import pytest
import torch

from apexcli.balance.mgda import min_norm_simplex
from apexcli.balance.normalize import explained_share, group_index, group_statistics
from apexcli.balance.priorities import (
    conflict_penalty,
    cosine_matrix,
    learning_potential,
    mix_floor,
    progress,
    progress_need,
    softmax_weights,
)
from apexcli.balance.probe import gradient_gram, gram_to_cosine, spread_over_groups

D = torch.float64


def test_group_statistics_masked_and_flat():
    values = torch.tensor([[1.0, 4.0], [3.0, 0.0], [2.0, 4.0], [7.0, 1.0]], dtype=D)
    mask = torch.tensor([[True, True], [True, False], [True, True], [True, True]])
    gidx = group_index(torch.tensor([10, 10, 10, 3]))  # ids sorted: 3 -> 0, 10 -> 1
    assert gidx.tolist() == [1, 1, 1, 0]
    st = group_statistics(values, mask, gidx)
    assert st.count.tolist() == [[1, 1], [3, 2]]
    assert torch.allclose(st.mean[1], torch.tensor([2.0, 4.0], dtype=D))
    assert st.std[1, 0].item() == pytest.approx(math.sqrt(2 / 3))
    assert st.std[1, 1].item() == 0.0  # two valid, equal values: flat
    assert st.flat.tolist() == [[True, True], [False, True]]


def test_learning_potential_hand_values():
    # objective 0: groups [0, 2] and [0, 2] -> std 1 each; objective 1 flat everywhere
    values = torch.tensor([[0.0, 5.0], [2.0, 5.0], [0.0, 1.0], [2.0, 1.0]], dtype=D)
    st = group_statistics(values, torch.ones_like(values, dtype=torch.bool), torch.tensor([0, 0, 1, 1]))
    lp = learning_potential(st, torch.tensor([2.0, 2.0], dtype=D))
    assert lp.tolist() == [0.5, 0.0]
    assert learning_potential(st, torch.tensor([0.0, 0.0], dtype=D)).tolist() == [0.0, 0.0]


def test_conflict_penalty_from_proxy_and_gram():
    z = torch.tensor([[1.0, 1.0, -1.0], [-1.0, -1.0, 1.0], [2.0, 2.0, -2.0]], dtype=D)
    cp = conflict_penalty(cosine_matrix(z))
    # a, b identical (cos 1), c opposed to both (cos -1): CP = [1/2, 1/2, 1]
    assert torch.allclose(cp, torch.tensor([0.5, 0.5, 1.0], dtype=D))
    same = gram_to_cosine(torch.tensor([[4.0, 2.0], [2.0, 1.0]]))  # g_b = g_a / 2
    assert torch.allclose(conflict_penalty(same), torch.zeros(2, dtype=D))
    opposed = gram_to_cosine(torch.tensor([[1.0, -3.0], [-3.0, 9.0]]))  # g_b = -3 g_a
    assert torch.allclose(conflict_penalty(opposed), torch.ones(2, dtype=D))
    orth = gram_to_cosine(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 2.0]]))
    assert torch.allclose(
        orth, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=D)
    )  # zero gradient: cos 0
    assert conflict_penalty(torch.ones(1, 1, dtype=D)).tolist() == [0.0]


def test_conflict_penalty_both_sides_pay():
    # a and b conflict (cos -1), c agrees with both
    cos = torch.tensor([[1.0, -1.0, 0.5], [-1.0, 1.0, 0.5], [0.5, 0.5, 1.0]], dtype=D)
    assert torch.allclose(conflict_penalty(cos), torch.tensor([0.5, 0.5, 0.0], dtype=D))


def test_progress_and_progress_need():
    p = progress(
        torch.tensor([3.0, 1.0, 0.0], dtype=D),
        torch.tensor([1.0, 0.0, 0.0], dtype=D),
        torch.tensor([1.0, 2.0, 0.0], dtype=D),
        None,
    )
    assert p.tolist() == [2.0, 0.5, 0.0]  # S_k(0) = 0 -> no unit yet -> 0
    pt = progress(
        torch.tensor([3.0, 1.0], dtype=D),
        torch.tensor([1.0, 0.0], dtype=D),
        torch.ones(2, dtype=D),
        torch.tensor([5.0, 0.0]),
    )
    assert pt.tolist() == [0.5, 1.0]  # half way; start already at target -> reached
    pn = progress_need(torch.tensor([2.0, 0.5, 1.0], dtype=D), eps=0.0)
    assert torch.allclose(pn, torch.tensor([0.0, 1.0, 2 / 3], dtype=D))
    assert int(torch.argmax(pn)) == 1  # the laggard
    pn_active = progress_need(torch.tensor([2.0, -9.0, 1.0], dtype=D), torch.tensor([True, False, True]), eps=0.0)
    assert pn_active.tolist() == [0.0, 0.0, 1.0]
    assert progress_need(torch.zeros(3, dtype=D)).tolist() == [0.0, 0.0, 0.0]


def test_softmax_floor_weights():
    w = mix_floor(softmax_weights(torch.tensor([0.0, math.log(3.0)], dtype=D), 1.0), 0.5)
    # softmax -> [1/4, 3/4] * 2 = [0.5, 1.5]; floor 0.5: 0.5 * w + 0.5 = [0.75, 1.25]
    assert torch.allclose(w, torch.tensor([0.75, 1.25], dtype=D))


def test_explained_share():
    contrib = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]], dtype=D)
    assert explained_share(contrib).tolist() == [1.0, 0.0]
    contrib = torch.tensor([[1.0, 1.0], [-1.0, -1.0]], dtype=D)
    assert explained_share(contrib).tolist() == [0.5, 0.5]
    assert explained_share(torch.zeros(3, 2, dtype=D)).tolist() == [0.0, 0.0]


@pytest.mark.parametrize(
    "gram, expected",
    [
        ([[1.0, 0.0], [0.0, 1.0]], [0.5, 0.5]),  # orthogonal unit gradients: equal weights
        ([[1.0, -1.0], [-1.0, 1.0]], [0.5, 0.5]),  # opposed: the min-norm point is the midpoint (norm 0)
        ([[4.0, 0.0], [0.0, 1.0]], [0.2, 0.8]),  # lambda_1 = (1 - 0) / (4 + 1 - 0)
        ([[1.0, 1.0], [1.0, 2.0]], [1.0, 0.0]),  # g1 = (1,0), g2 = (1,1): g1 itself is the min-norm point
        ([[1.0, 1.0], [1.0, 1.0]], [0.5, 0.5]),  # identical gradients: any point; we take the middle
    ],
)
def test_min_norm_two_objectives(gram, expected):
    lam = min_norm_simplex(torch.tensor(gram, dtype=D))
    assert torch.allclose(lam, torch.tensor(expected, dtype=D))


def test_min_norm_projected_gradient_three_objectives():
    lam = min_norm_simplex(torch.eye(3, dtype=D))
    assert torch.allclose(lam, torch.full((3,), 1 / 3, dtype=D), atol=1e-6)
    # g1 = (1,0), g2 = (-1,0), g3 = (0,1): min-norm point is (1/2, 1/2, 0) with norm 0
    g = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=D)
    lam = min_norm_simplex(g @ g.T)
    assert torch.allclose(lam, torch.tensor([0.5, 0.5, 0.0], dtype=D), atol=1e-6)
    assert lam.sum().item() == pytest.approx(1.0)


def test_gradient_gram_on_a_linear_model_matches_hand_dot_products():
    # pred_i = x_i . w + b, loss(adv) = -mean_i adv_i pred_i  =>  grad_w = -X^T adv / n, grad_b = -sum(adv) / n
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    w = torch.zeros(2, requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    unused = torch.zeros(3, requires_grad=True)
    adv = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0]])

    def loss_for(a):
        return -(a * (x @ w + b)).mean()

    gram = gradient_gram(loss_for, adv, [w, b, unused])
    # g1 = (-(1 - 1)/3, -(0 + 0 - 1)/3, -(1 + 0 - 1)/3) = (0, 1/3, 0)
    # g2 = (-(0 + 0 + 1)/3, -(0 + 2 + 1)/3, -(0 + 1 + 1)/3) = (-1/3, -1, -2/3)
    g1 = torch.tensor([0.0, 1 / 3, 0.0], dtype=D)
    g2 = torch.tensor([-1 / 3, -1.0, -2 / 3], dtype=D)
    expected = torch.tensor([[g1 @ g1, g1 @ g2], [g2 @ g1, g2 @ g2]], dtype=D)
    assert gram.dtype == D and gram.shape == (2, 2)
    assert torch.allclose(gram, expected, atol=1e-7)
    cos = gram_to_cosine(gram)
    assert cos[0, 1].item() == pytest.approx((g1 @ g2 / (g1.norm() * g2.norm())).item(), abs=1e-6)
    # reduce hook sees the stacked [K, P] gradients
    doubled = gradient_gram(loss_for, adv, [w, b], reduce=lambda t: 2 * t)
    assert torch.allclose(doubled, 4 * expected, atol=1e-6)


def test_probe_sub_batch_spreads_over_the_prompts():
    groups = [7, 7, 7, 7, 3, 3, 3, 3, 9, 9]
    # round-robin in order of appearance: one of each prompt first, then the second of each
    assert spread_over_groups(groups, 4) == [0, 1, 4, 8]
    assert spread_over_groups(groups, 6) == [0, 1, 4, 5, 8, 9]
    assert spread_over_groups(groups, 100) == list(range(10))
    assert spread_over_groups([], 4) == []
    # the trainer's old choice, the first n samples, would have held one prompt only
    assert len({groups[i] for i in spread_over_groups(groups, 3)}) == 3
