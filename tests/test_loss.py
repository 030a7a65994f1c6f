"""GRPO PPO-clip loss on hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from apexcli.train.loss import clip_advantages, grpo_policy_loss, velocity_anchor

# eps = 0.2; per sample (A, ratio) and the PPO-clip term max(-A r, -A clip(r, 0.8, 1.2)):
#   (+1, 1.1) inside           -> max(-1.1, -1.1) = -1.1   grad d/dlogp = -A r = -1.1
#   (+1, 1.5) above, A > 0     -> max(-1.5, -1.2) = -1.2   clipped: grad 0
#   (-2, 1.5) above, A < 0     -> max( 3.0,  2.4) =  3.0   unclipped (pessimistic): grad 3.0
#   (-2, 0.5) below, A < 0     -> max( 1.0,  1.6) =  1.6   clipped: grad 0
#   (+1, 0.5) below, A > 0     -> max(-0.5, -0.8) = -0.5   unclipped: grad -0.5
ADV = [1.0, 1.0, -2.0, -2.0, 1.0]
RATIO = [1.1, 1.5, 1.5, 0.5, 0.5]
TERMS = [-1.1, -1.2, 3.0, 1.6, -0.5]
GRAD_PER_SAMPLE = [-1.1, 0.0, 3.0, 0.0, -0.5]
OLD_LOGP = [-1.3, 0.2, -0.7, 2.0, 0.0]


def _inputs():
    old = torch.tensor(OLD_LOGP, dtype=torch.float64)
    logp = (old + torch.log(torch.tensor(RATIO, dtype=torch.float64))).requires_grad_(True)
    return logp, old, torch.tensor(ADV, dtype=torch.float64)


def test_ppo_clip_hand_values():
    logp, old, adv = _inputs()
    out = grpo_policy_loss(logp, old, adv, clip_range=0.2)
    expected = sum(TERMS) / 5  # 0.36
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    assert out.policy_loss.item() == pytest.approx(expected, abs=1e-12)
    assert out.ratio_mean.item() == pytest.approx(sum(RATIO) / 5, abs=1e-12)
    assert out.clip_frac.item() == pytest.approx(4 / 5)  # all but the 1.1 sample leave [0.8, 1.2]
    assert out.kl.item() == 0.0


def test_ppo_clip_gradient_vanishes_exactly_where_clipped():
    logp, old, adv = _inputs()
    grpo_policy_loss(logp, old, adv, clip_range=0.2).loss.backward()
    expected = torch.tensor(GRAD_PER_SAMPLE, dtype=torch.float64) / 5
    torch.testing.assert_close(logp.grad, expected, rtol=0, atol=1e-12)


def test_on_policy_loss_is_minus_mean_advantage():
    """ratio == 1: loss = -mean(A), gradient wrt logp = -A / B, nothing clipped."""
    adv = torch.tensor([0.5, -1.5, 2.0, -1.0])
    logp = torch.tensor([-0.3, 0.1, 0.4, -2.0], requires_grad=True)
    out = grpo_policy_loss(logp, logp.detach().clone(), adv, clip_range=1e-4)
    assert out.loss.item() == pytest.approx(-0.0, abs=1e-7)
    assert out.ratio_mean.item() == 1.0 and out.clip_frac.item() == 0.0
    out.loss.backward()
    torch.testing.assert_close(logp.grad, -adv / 4)


def test_kl_term_is_weighted_by_beta():
    logp, old, adv = _inputs()
    kl = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5], dtype=torch.float64, requires_grad=True)
    out = grpo_policy_loss(logp, old, adv, clip_range=0.2, kl=kl, kl_beta=0.5)
    assert out.loss.item() == pytest.approx(0.36 + 0.5 * 0.3, abs=1e-12)
    assert out.policy_loss.item() == pytest.approx(0.36, abs=1e-12)
    assert out.kl.item() == pytest.approx(0.3, abs=1e-12)
    out.loss.backward()
    torch.testing.assert_close(kl.grad, torch.full((5,), 0.5 / 5, dtype=torch.float64))
    # beta = 0: the KL is reported but does not enter the loss
    logp, old, adv = _inputs()
    out = grpo_policy_loss(logp, old, adv, clip_range=0.2, kl=kl.detach(), kl_beta=0.0)
    assert out.loss.item() == pytest.approx(0.36, abs=1e-12)
    assert out.kl.item() == pytest.approx(0.3, abs=1e-12)


def test_tiny_clip_range_of_mean_log_probs():
    """The default eps = 1e-4: a log-prob change of 2e-4 is clipped, 5e-5 is not."""
    old = torch.zeros(2)
    logp = torch.tensor([2e-4, 5e-5])
    out = grpo_policy_loss(logp, old, torch.ones(2), clip_range=1e-4)
    assert out.clip_frac.item() == 0.5
    expected = (-(1 + 1e-4) - math.exp(5e-5)) / 2  # first clipped at 1 + eps, second unclipped
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)


def test_clip_advantages():
    a = torch.tensor([-7.0, -5.0, 0.3, 5.0, 9.0])
    torch.testing.assert_close(clip_advantages(a, 5.0), torch.tensor([-5.0, -5.0, 0.3, 5.0, 5.0]))
    torch.testing.assert_close(clip_advantages(a, 0.0), a)  # 0 disables the clip


def test_velocity_anchor_is_the_per_sample_mean_squared_difference():
    ref = torch.zeros(2, 1, 2, 2)
    v = torch.tensor([[[[1.0, -1.0], [0.0, 0.0]]], [[[2.0, 2.0], [2.0, 2.0]]]])
    torch.testing.assert_close(velocity_anchor(v, ref), torch.tensor([0.5, 4.0]))
    assert torch.all(velocity_anchor(ref, ref) == 0)
