"""GRPO (Flow-GRPO): PPO-clip on the log-probs of the trained SDE steps, a KL penalty to the
LoRA-disabled base model, and optionally the velocity anchor on the steps outside the window."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import torch

from apexcli.flow.rollout import PromptEmbeds, Trajectory
from apexcli.seeds import mix_seed
from apexcli.train.loss import grpo_policy_loss, step_kl, velocity_anchor
from apexcli.train.losses.base import MicroBatch, PolicyLoss, ProbeTerms, Reduction, UpdateBatch


class GrpoLoss(PolicyLoss):
    # ratio_first: on-policy evidence (1 at the first micro-batch); ratio_max_dev: the largest
    # |ratio - 1| of any trained sample, above clip_range once the updates go off-policy
    reductions: ClassVar[Mapping[str, Reduction]] = {"ratio_first": "first", "ratio_max_dev": "max"}

    @property
    def points_per_sample(self) -> int:
        return max(1, math.ceil(len(self.steps_trained) * self.cfg.train.timestep_fraction))

    def prepare(self, batch: UpdateBatch, *, on_policy: bool) -> None:
        super().prepare(batch, on_policy=on_policy)
        # the steps outside the window (the last excepted: it only jumps to x0) hold the anchor
        self.outside = (
            [i for i in range(batch.traj.num_steps - 1) if i not in self.steps_trained]
            if self.cfg.train.experimental.anchor_beta > 0
            else []
        )

    def begin_epoch(self, epoch: int, generator: torch.Generator) -> None:
        """Per sample, a random order of the window's steps: the first ``points_per_sample`` train."""
        window = torch.tensor(self.steps_trained)
        orders = [window[torch.randperm(len(window), generator=generator)] for _ in range(len(self.batch.traj))]
        self.step_order = torch.stack(orders).to(self.batch.traj.latents.device)
        self.generator = generator  # the anchor's steps come from the same stream, after the orders

    def loss(self, micro: MicroBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        t, b, rows = self.cfg.train, self.batch, micro.rows
        ts = self.step_order[rows, micro.point]
        x, x_next = b.traj.latents[rows, ts], b.traj.latents[rows, ts + 1]
        sigma, sigma_next = b.sigmas[ts], b.sigmas[ts + 1]
        old_logp = b.traj.log_probs[rows, ts]
        out = self.models.log_prob(self.models.policy, b.traj, x, x_next, sigma, sigma_next, micro.cond)
        kl = None
        if t.kl_beta > 0:
            ref = self.models.base_log_prob(b.traj, x, x_next, sigma, sigma_next, micro.cond)
            kl = step_kl(out, ref, t.kl_form)
        result = grpo_policy_loss(
            out.log_prob, old_logp, micro.advantages, clip_range=t.clip_range, kl=kl, kl_beta=t.kl_beta
        )
        loss = result.loss
        stats = {
            "kl": result.kl,
            "ratio_mean": result.ratio_mean,
            "clip_frac": result.clip_frac,
            "ratio_first": result.ratio_mean,
            "ratio_max_dev": (out.log_prob.detach() - old_logp).exp().sub(1).abs().max(),
        }
        if self.outside and micro.point == 0:  # once per sample and micro-batch, in the same backward
            anchor = self._anchor(rows, micro.cond)
            stats["anchor"] = anchor.detach()
            # x points_per_sample: weighed against the policy loss's mean over trained steps
            loss = loss + t.experimental.anchor_beta * self.points_per_sample * anchor
        return loss, stats

    def _anchor(self, rows: torch.Tensor, cond: PromptEmbeds) -> torch.Tensor:
        """Mean over the micro-batch of ``velocity_anchor`` at one random outside step per sample."""
        picks = torch.tensor(self.outside)[torch.randint(len(self.outside), (len(rows),), generator=self.generator)]
        picks = picks.to(rows.device)
        x, sigma = self.batch.traj.latents[rows, picks], self.batch.sigmas[picks]
        v = self.models.velocity(self.models.policy, x, sigma, cond)
        return velocity_anchor(v, self.models.base_velocity(x, sigma, cond)).mean()

    def probe_terms(self, model: torch.nn.Module, traj: Trajectory, cond: PromptEmbeds, step: int) -> ProbeTerms:
        """The importance ratio at one step of the window, drawn per update; weight ``-A``."""
        gen = torch.Generator().manual_seed(mix_seed(self.cfg.seed, step, 7))
        t = self.steps_trained[int(torch.randint(len(self.steps_trained), (1,), generator=gen))]
        x, x_next, sigma, sigma_next = traj.transition(t)

        def terms() -> torch.Tensor:
            out = self.models.log_prob(model, traj, x, x_next, sigma, sigma_next, cond)
            return torch.exp(out.log_prob - traj.log_probs[:, t])

        return ProbeTerms(terms=terms, weight=lambda adv: -adv)
