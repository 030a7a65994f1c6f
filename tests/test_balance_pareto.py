"""balance.strategy=pareto (dominance filter + low-reward suppression) on hand-computed tensors.

The shared edge cases (constant rewards, NaN column, inf entries, one objective, state
round-trip) run for every strategy, pareto included, in test_balance.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from apexcli.balance import BalanceConfig, build_balancer
from apexcli.balance.pareto import dominated_in_groups
from apexcli.errors import ApexError
from apexcli.train.loss import grpo_policy_loss

NAN = float("nan")


def test_dominance_within_groups_only_and_nan_compares_on_the_rest():
    r = torch.tensor(
        [
            [1.0, 4.0],
            [4.0, 1.0],
            [2.0, 2.0],
            [3.0, 3.0],  # group 0: (3,3) dominates (2,2)
            [0.0, 0.0],
            [0.0, 0.0],  # group 1: duplicates dominate nothing
            [1.0, NAN],
            [2.0, 5.0],
        ],
        dtype=torch.float64,
    )  # group 2: compared on a only
    g = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    mask = torch.isfinite(r)
    values = torch.where(mask, r, torch.zeros_like(r))
    dom = dominated_in_groups(values, mask, g, torch.tensor([True, True]))
    assert dom.tolist() == [False, False, True, False, False, False, True, False]
    # a (100, 100) in another group dominates nobody here: groups are not compared
    big = torch.cat([values[:4], torch.tensor([[100.0, 100.0]], dtype=torch.float64)])
    dom = dominated_in_groups(
        big, torch.ones_like(big, dtype=torch.bool), torch.tensor([0, 0, 0, 0, 1]), torch.tensor([True, True])
    )
    assert dom.tolist() == [False, False, True, False, False]


def test_hand_values_dominated_and_suppressed_samples_get_zero():
    # z_a = z_b = ±1.342, ±0.447: s = [0, 0, -0.894, 0.894]; (2,2) is dominated, the two
    # trade-offs have s = 0 (not > 0: suppressed), only (3,3) keeps its advantage:
    # A = [0, 0, 0, s] / sqrt(s^2 / 4) = [0, 0, 0, 2]
    r = torch.tensor([[1.0, 4.0], [4.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    adv, info = build_balancer("pareto", ["a", "b"])(r, torch.zeros(4, dtype=torch.long))
    assert torch.allclose(adv, torch.tensor([0.0, 0.0, 0.0, 2.0]), atol=1e-5)
    m = info["metrics"]
    assert (m["balance/pareto/dominated_frac"], m["balance/pareto/suppressed_frac"], m["balance/pareto/kept_frac"]) == (
        0.25,
        0.5,
        0.25,
    )


def test_one_flat_group_and_one_objective():
    # K = 1: group 0 = [1, 2, 3] keeps only 3 (z = sqrt(1.5)); group 1 flat: s = 0, suppressed.
    # A = [0, 0, z, 0, 0, 0] / sqrt(z^2 / 6) = sqrt(6) at the best sample
    r = torch.tensor([[1.0], [2.0], [3.0], [5.0], [5.0], [5.0]])
    adv, _ = build_balancer("pareto", ["a"])(r, torch.tensor([0, 0, 0, 1, 1, 1]))
    assert torch.allclose(adv, torch.tensor([0, 0, math.sqrt(6), 0, 0, 0]), atol=1e-5)


def test_without_suppression_and_without_dominance_it_is_gdpo():
    # three mutual trade-offs: nobody dominated; min_score = null keeps all -> gdpo exactly
    r = torch.tensor([[0.0, 1.0], [3.0, 0.0], [2.0, 0.9], [1.0, 1.0], [2.0, 3.0], [0.5, 2.0]])
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    r[3:] = torch.tensor([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]])
    adv, _ = build_balancer("pareto", ["a", "b"], min_score=None)(r, g)
    ref, _ = build_balancer("gdpo", ["a", "b"])(r, g)
    assert torch.allclose(adv, ref, atol=1e-6)
    # with the default suppression (s > 0), the negative combined scores are zeroed
    adv0, _ = build_balancer("pareto", ["a", "b"])(r, g)
    z = ref.double()
    assert torch.equal(adv0 == 0, z <= 0)
    assert (adv0[adv0 != 0] > 0).all()


def test_a_reward_scaled_x1000_or_shifted_changes_nothing():
    gen = torch.Generator().manual_seed(0)
    r = torch.randn(24, 3, generator=gen, dtype=torch.float64)
    g = torch.arange(4).repeat_interleave(6)
    adv, _ = build_balancer("pareto", ["a", "b", "c"])(r, g)
    for transform in (lambda x: 1000 * x, lambda x: x - 1e6):
        r2 = r.clone()
        r2[:, 1] = transform(r2[:, 1])
        adv2, _ = build_balancer("pareto", ["a", "b", "c"])(r2, g)
        assert torch.allclose(adv, adv2, atol=1e-4)
    assert (adv == 0).sum() >= 12  # dominated or below the group's combined mean


def test_zero_weight_objective_is_monitored_not_compared():
    # b has weight 0: (1, 9) and (2, 0) compare on a only, so (1, 9) is dominated
    r = torch.tensor([[1.0, 9.0], [2.0, 0.0]])
    adv, info = build_balancer("pareto", ["a", "b"], weights=[1.0, 0.0])(r, torch.zeros(2, dtype=torch.long))
    assert adv[0].item() == 0.0 and adv[1].item() > 0
    assert info["metrics"]["balance/pareto/dominated_frac"] == 0.5


def test_masked_samples_add_nothing_to_the_policy_gradient():
    # the trainer's loss: a sample with advantage 0 has zero gradient whatever its ratio
    logp = torch.tensor([0.3, -0.2, 0.1], requires_grad=True)
    old = torch.tensor([0.1, 0.0, 0.1])
    out = grpo_policy_loss(logp, old, torch.tensor([0.0, 1.5, 0.0]), clip_range=1.0)
    out.loss.backward()
    assert logp.grad[0].item() == 0.0 and logp.grad[2].item() == 0.0 and logp.grad[1].item() != 0.0


def test_config_validation_and_option():
    cfg = BalanceConfig(strategy="pareto")
    cfg.pareto.min_score = float("inf")
    with pytest.raises(ApexError, match="config key .balance.pareto.min_score. must be a finite number, got inf"):
        cfg.validate(2)
    b = build_balancer("pareto", ["a", "b"], min_score=-0.5)
    assert b.cfg.pareto.min_score == -0.5


def test_filtered_samples_leave_the_update_unless_asked_to_stay():
    from types import SimpleNamespace

    from apexcli.train.trainer import Trainer

    r = torch.tensor([[1.0, 1.0], [0.0, 0.0], [2.0, 0.5], [0.5, 2.0]])
    adv, _ = build_balancer("pareto", ["a", "b"])(r, torch.tensor([0, 0, 0, 0]))
    for drop in (True, False):
        b = build_balancer("pareto", ["a", "b"], drop_zero_advantage=drop)
        fake = SimpleNamespace(
            balancer=b,
            accelerator=SimpleNamespace(num_processes=1, process_index=0),
            cfg=SimpleNamespace(seed=0),
            step=1,
        )
        kept = Trainer._selected_samples(fake, adv, 1).tolist()
        assert kept == ([i for i in range(4) if adv[i] != 0] if drop else [0, 1, 2, 3])
    assert adv[1].item() == 0.0  # (0, 0) is dominated by every other sample
