"""``train.loss=nft``: negative-aware flow matching on the rollout's final samples, with the
rollout policy's velocity as the trust region's reference and a velocity KL to the base model."""

from __future__ import annotations

import torch

from apexcli.flow.rollout import PromptEmbeds, Trajectory
from apexcli.train.loss import nft_loss, nft_weight, velocity_anchor
from apexcli.train.losses.base import MicroBatch, PolicyLoss, ProbeTerms, UpdateBatch
from apexcli.train.nft_points import NftPoints, draw_nft_points


class NftLoss(PolicyLoss):
    @property
    def points_per_sample(self) -> int:
        return self.cfg.train.experimental.nft_timesteps

    def prepare(self, batch: UpdateBatch, *, on_policy: bool) -> None:
        super().prepare(batch, on_policy=on_policy)
        self.points = self._points(batch.traj, batch.group_ids, self.points_per_sample, batch.step)
        # on-policy the rollout's velocity is the live one: no forward pass needed to know it
        self.v_old = None if on_policy else self._old_velocities()

    def loss(self, micro: MicroBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        t, b, rows = self.cfg.train, self.batch, micro.rows
        x_t, sigma_t, target = self.points.at(micro.epoch, rows, micro.point, b.sigmas, b.traj.final)
        v = self.models.velocity(self.models.policy, x_t, sigma_t, micro.cond)
        v_old = v if self.v_old is None else self.v_old[micro.epoch, micro.point][rows]
        result = nft_loss(
            v, v_old, target, micro.advantages, beta=t.experimental.nft_beta, adv_scale=t.experimental.nft_adv_scale
        )
        loss, stats = result.loss, {}
        if t.kl_beta > 0:
            kl = velocity_anchor(v, self.models.base_velocity(x_t, sigma_t, micro.cond)).mean()
            stats["kl"] = kl.detach()
            loss = loss + t.kl_beta * kl
        return loss, {**stats, "nft_flow_error": result.flow_error, "nft_drift": result.drift}

    def probe_terms(self, model: torch.nn.Module, traj: Trajectory, cond: PromptEmbeds, step: int) -> ProbeTerms:
        """The on-policy nft gradient per unit weight, ``2 <v - target, grad v>`` (loss.nft_loss),
        at one point per sample drawn as the update draws them (each sample its own group)."""
        points = self._points(traj, None, 1, step)
        every = torch.arange(len(traj), device=traj.latents.device)
        x_t, sigma_t, target = points.at(0, every, 0, traj.sigmas.to(traj.latents.device), traj.final)

        def terms() -> torch.Tensor:
            v = self.models.velocity(model, x_t, sigma_t, cond)
            return 2.0 * ((v.detach() - target) * v).flatten(1).mean(dim=1)

        scale = self.cfg.train.experimental.nft_adv_scale
        return ProbeTerms(terms=terms, weight=lambda adv: nft_weight(adv, scale))

    def _points(self, traj: Trajectory, group_ids: torch.Tensor | None, per_sample: int, step: int) -> NftPoints:
        return draw_nft_points(
            torch.arange(len(traj)) if group_ids is None else group_ids,
            seed=self.cfg.seed,
            step=step,
            epochs=self.cfg.train.inner_epochs,
            points_per_sample=per_sample,
            grid_steps=traj.num_steps,
            latent_shape=tuple(traj.final.shape[1:]),
            device=traj.latents.device,
        )

    @torch.no_grad()
    def _old_velocities(self) -> torch.Tensor:
        """``[E, J, n, C, h, w]`` the rollout policy's velocity at every point, before any optimizer
        step moves it (the reference of nft's trust region)."""
        b = self.batch
        epochs, _, per_sample = self.points.steps.shape
        micro = self.cfg.train.train_batch_size
        device = b.traj.latents.device
        out = torch.empty(epochs, per_sample, *b.traj.final.shape, device=device)
        for e in range(epochs):
            for j in range(per_sample):
                for start in range(0, len(b.traj), micro):
                    rows = torch.arange(start, min(start + micro, len(b.traj)), device=device)
                    x_t, sigma_t, _ = self.points.at(e, rows, j, b.sigmas, b.traj.final)
                    out[e, j, rows] = self.models.velocity(self.models.policy, x_t, sigma_t, b.cond.index(rows))
        return out
