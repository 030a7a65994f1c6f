"""The policy-loss interface: the update loop runs any ``PolicyLoss`` without knowing its name,
and folds each statistic by the rule the loss declares."""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch

from apexcli.config import POLICY_LOSS_NAMES, resolve_config
from apexcli.flow.rollout import Trajectory
from apexcli.train.losses import POLICY_LOSSES, GrpoLoss, MicroBatch, NftLoss, PolicyLoss, ProbeTerms, UpdateBatch
from apexcli.train.losses.base import Reduction
from apexcli.train.sampler import plan_step
from apexcli.train.trainer import Trainer
from apexcli.train.update import UpdateStatistics
from helpers import TINY_OVERRIDES


def test_every_configurable_loss_has_one_implementation():
    assert set(POLICY_LOSSES) == set(POLICY_LOSS_NAMES)
    assert POLICY_LOSSES["grpo"] is GrpoLoss and POLICY_LOSSES["nft"] is NftLoss


def test_statistics_fold_by_the_declared_rule():
    stats = UpdateStatistics({"first": "first", "peak": "max"})
    for i, value in enumerate([1.0, 3.0, 2.0]):
        stats.add(
            torch.tensor(value),
            {"first": torch.tensor(10.0 + i), "peak": torch.tensor(value), "rare": torch.tensor(value)}
            if i == 0
            else {"first": torch.tensor(10.0 + i), "peak": torch.tensor(value)},
        )
    one_process = SimpleNamespace(num_processes=1)
    out = stats.reduced(one_process, torch.device("cpu"))
    assert out == {"loss": 2.0, "first": 10.0, "peak": 3.0, "rare": 1.0}  # a statistic of some micro-batches only


class VelocityEnergy(PolicyLoss):
    """A loss the loop has never heard of: the advantage-weighted squared velocity at the final sample."""

    reductions: ClassVar[Mapping[str, Reduction]] = {"v_peak": "max"}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.micro_batches: list[tuple[int, int]] = []

    @property
    def points_per_sample(self) -> int:
        return 2

    def prepare(self, batch: UpdateBatch, *, on_policy: bool) -> None:
        super().prepare(batch, on_policy=on_policy)
        self.on_policy = on_policy

    def loss(self, micro: MicroBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.micro_batches.append((micro.epoch, micro.point))
        b = self.batch
        sigma = b.sigmas[micro.point].expand(len(micro.rows))
        v = self.models.velocity(self.models.policy, b.traj.final[micro.rows], sigma, micro.cond)
        energy = v.square().flatten(1).mean(dim=1)
        return (micro.advantages * energy).mean(), {
            "v_energy": energy.detach().mean(),
            "v_peak": v.detach().abs().max(),
        }

    def probe_terms(self, model, traj, cond, step) -> ProbeTerms:
        sigma = traj.sigmas[:1].expand(len(traj)).to(traj.latents.device)
        return ProbeTerms(
            terms=lambda: self.models.velocity(model, traj.final, sigma, cond).square().flatten(1).mean(dim=1),
            weight=lambda adv: adv,
        )


def test_a_new_loss_trains_through_the_shared_update_loop(tmp_path):
    cfg = resolve_config(
        preset="tiny",
        options={"out": str(tmp_path / "run"), "objectives": ["brightness", "contrast"]},
        overrides=[*TINY_OVERRIDES, "balance.strategy=gdpo"],
    )
    trainer = Trainer(cfg, argv=["test"])
    try:
        trainer.setup()
        energy = VelocityEnergy(cfg, trainer.policy_loss.models, trainer.steps_trained)
        trainer.update.policy_loss = energy
        trainer.gradient_probe.policy_loss = energy
        trainer.step = 1
        plan = plan_step(
            step=1,
            seed=cfg.seed,
            num_prompts=len(trainer.prompts),
            prompts_per_step=2,
            group_size=2,
            rank=0,
            world_size=1,
        )
        trajectories, _, _ = trainer._sample(plan)
        before = [p.detach().clone() for p in trainer.lora_params]
        row = trainer._update(trajectories, torch.tensor([1.0, -1.0, 0.5, -0.5]), list(plan.prompt_ids))
        # 4 samples in micro-batches of 2, 2 points each: 4 backward passes, one optimizer step
        assert energy.micro_batches == [(0, 0), (0, 1), (0, 0), (0, 1)] and energy.on_policy
        assert row["optimizer_steps"] == 1 and row["samples_trained"] == 4
        assert row["v_energy"] > 0 and row["v_peak"] >= row["v_energy"] ** 0.5
        assert "ratio_mean" not in row and "nft_drift" not in row  # nothing of the built-in losses
        assert any(not torch.equal(a, p) for a, p in zip(before, trainer.lora_params))
        # the gradient probe takes the same loss's terms: a Gram of two objectives' gradients
        per_objective = torch.tensor([[1.0, 0.5], [-1.0, 0.5], [0.5, -1.0], [-0.5, 0.0]])
        gram = trainer.gradient_probe(
            Trajectory.cat(trajectories),
            per_objective,
            trainer.embeds.index(plan.prompt_ids),
            plan.group_ids,
            trainer.step,
        )
        assert gram.shape == (2, 2) and torch.allclose(gram, gram.T) and (gram.diagonal() > 0).all()
    finally:
        trainer.close()


@pytest.mark.parametrize("loss", ["grpo", "nft"])
def test_the_builtin_losses_report_their_own_statistics(tmp_path, loss):
    cfg = resolve_config(
        preset="tiny",
        options={"out": str(tmp_path / "run"), "objectives": ["brightness"]},
        overrides=[*TINY_OVERRIDES, f"train.loss={loss}", "train.kl_beta=0.1"],
    )
    trainer = Trainer(cfg, argv=["test"])
    try:
        trainer.setup()
        trainer.step = 1
        row = trainer.train_step()
    finally:
        trainer.close()
    own = {"grpo": {"ratio_mean", "clip_frac", "ratio_first", "ratio_max_dev"}, "nft": {"nft_flow_error", "nft_drift"}}
    assert own[loss] <= row.keys() and not (own["nft" if loss == "grpo" else "grpo"] & row.keys())
    if loss == "grpo":
        assert row["ratio_first"] == pytest.approx(1.0, abs=1e-6)  # the first micro-batch is on-policy
    assert row["kl"] >= 0 and row["optimizer_steps"] >= 1
