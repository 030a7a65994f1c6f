"""The nft loss (train.loss=nft): its gradient, its trust region and where it trains each sample."""

from __future__ import annotations

import pytest
import torch

from apexcli.train.loss import nft_loss, nft_weight
from apexcli.train.nft_points import draw_nft_points, flow_matching_point


def _batch(seed: int = 0, b: int = 4):
    g = torch.Generator().manual_seed(seed)
    shape = (b, 2, 3, 3)
    return (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))


def test_weight_is_the_clamped_advantage():
    w = nft_weight(torch.tensor([-3.0, -0.5, 0.0, 0.25, 2.0]), scale=1.0)
    assert w.tolist() == [-1.0, -0.5, 0.0, 0.25, 1.0]
    assert nft_weight(torch.tensor([1.0]), scale=2.0).item() == 0.5


def test_on_policy_gradient_is_advantage_weighted_flow_matching():
    """At v == v_old the gradient is w_i * d|v_i - target_i|^2 / dv, whatever beta."""
    v0, target, _ = _batch()
    adv = torch.tensor([1.5, -0.3, 0.0, -4.0], dtype=torch.float64)
    for beta in (0.1, 1.0, 7.0):
        v = v0.clone().requires_grad_(True)
        out = nft_loss(v, v, target, adv, beta=beta, adv_scale=1.0)
        assert out.loss.item() == 0.0 and out.drift.item() == 0.0
        out.loss.backward()
        per_elem = v0[0].numel()
        expected = nft_weight(adv, 1.0).view(-1, 1, 1, 1) * 2 * (v0 - target) / per_elem / len(adv)
        torch.testing.assert_close(v.grad, expected)
    assert out.flow_error.item() == pytest.approx((v0 - target).square().mean().item())


def test_it_is_the_positive_negative_mixture_less_a_constant():
    """loss = mean_i (r|v_old + b d - y|^2 + (1 - r)|v_old - b d - y|^2) / b - const."""
    v_old, target, v = _batch(1)
    adv = torch.tensor([0.7, -0.2, 1.0, -1.0], dtype=torch.float64)
    beta = 0.3
    r = (1 + nft_weight(adv, 1.0)).view(-1, 1, 1, 1) / 2
    d = v - v_old

    def mixture(dd):
        pos = (v_old + beta * dd - target).square().mean(dim=(1, 2, 3))
        neg = (v_old - beta * dd - target).square().mean(dim=(1, 2, 3))
        return ((r.flatten() * pos + (1 - r.flatten()) * neg) / beta).mean()

    out = nft_loss(v, v_old, target, adv, beta=beta, adv_scale=1.0)
    assert out.loss.item() == pytest.approx((mixture(d) - mixture(torch.zeros_like(d))).item(), abs=1e-12)


def test_trust_region_minimiser_shrinks_with_beta():
    """Gradient descent on v ends at d = -w (v_old - target) / beta: a good sample (w = 1) is
    moved toward its target by 1/beta of the way, a bad one (w = -1) away from it."""
    v_old, target, _ = _batch(2, b=2)
    adv = torch.tensor([5.0, -5.0], dtype=torch.float64)
    for beta in (1.0, 4.0):
        v = v_old.clone().requires_grad_(True)
        # the loss's curvature in each element is 2 beta / (elements x batch): half a Newton step
        opt = torch.optim.SGD([v], lr=0.5 * v_old.numel() / (2 * beta))
        for _ in range(60):
            opt.zero_grad()
            nft_loss(v, v_old, target, adv, beta=beta, adv_scale=1.0).loss.backward()
            opt.step()
        w = torch.tensor([1.0, -1.0], dtype=torch.float64).view(-1, 1, 1, 1)
        torch.testing.assert_close(v.detach() - v_old, -w * (v_old - target) / beta)


def test_flow_matching_point_is_rectified_flow():
    x0, noise, _ = _batch(3)
    sigma = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    x_t, target = flow_matching_point(x0, sigma, noise)
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[3], noise[3])
    torch.testing.assert_close(x_t[1], 0.75 * x0[1] + 0.25 * noise[1])
    torch.testing.assert_close(target, noise - x0)
    # the velocity carries x_t to x0 at sigma 0 and to the noise at sigma 1
    torch.testing.assert_close(x_t[2] - 0.5 * target[2], x0[2])


def test_points_are_shared_within_a_group_and_independent_of_sharding():
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    kw = dict(seed=3, step=5, epochs=2, points_per_sample=3, grid_steps=10, latent_shape=(2, 4, 4), device="cpu")
    pts = draw_nft_points(groups, **kw)
    sigmas = torch.linspace(1, 0, 11)
    final = torch.randn(9, 2, 4, 4)
    rows = torch.arange(9)
    for e in range(2):
        for j in range(3):
            x_t, sigma, target = pts.at(e, rows, j, sigmas, final)
            assert sigma[0] == sigma[1] == sigma[2] and sigma[3] == sigma[5]
            noise = target + final
            torch.testing.assert_close(noise[0], noise[2])
            assert not torch.allclose(noise[0], noise[3])
    # each sample's j points are distinct grid steps (sigma > 0 only)
    assert all(len(set(pts.steps[e, g].tolist())) == 3 for e in range(2) for g in range(3))
    assert int(pts.steps.max()) < 10
    # a process holding only groups 1 and 2 draws the same points for them
    shard = draw_nft_points(groups[3:], **kw)
    torch.testing.assert_close(shard.noise, pts.noise[:, 1:])
    assert torch.equal(shard.steps, pts.steps[:, 1:])
