"""Where the nft loss trains each sample: a step of the sampler's grid and a noise per group.

A group's samples share their steps and noises (common random numbers), so within a group the
advantage-weighted flow-matching terms differ only through the samples' x0: the parts of the
gradient that all of them share cancel, as their advantages sum to zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from apexcli.seeds import mix_seed


def flow_matching_point(
    x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_t, target)``: ``x_t = (1 - sigma) x0 + sigma noise`` and the velocity ``noise - x0``
    (rectified flow, as SD3 and its scheduler define it); ``sigma`` ``[B]``."""
    s = sigma.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1.0 - s) * x0 + s * noise, noise - x0


@dataclass
class NftPoints:
    steps: torch.Tensor
    """``[E, G, J]`` long: grid step (index into the rollout's sigmas) per epoch, group and j."""
    noise: torch.Tensor
    """``[E, G, J, C, h, w]`` the noise of each of those points."""
    group_of: torch.Tensor
    """``[n]`` long: each local sample's row in ``G``."""

    def at(self, epoch: int, rows: torch.Tensor, j: int, sigmas: torch.Tensor, final: torch.Tensor):
        """``(x_t, sigma [B], target)`` of samples ``rows`` at their j-th point of ``epoch``."""
        g = self.group_of[rows]
        sigma = sigmas[self.steps[epoch, g, j]]
        x_t, target = flow_matching_point(final[rows], sigma, self.noise[epoch, g, j])
        return x_t, sigma, target


def draw_nft_points(
    group_ids: torch.Tensor,
    *,
    seed: int,
    step: int,
    epochs: int,
    points_per_sample: int,
    grid_steps: int,
    latent_shape: tuple[int, ...],
    device: torch.device | str,
) -> NftPoints:
    """Each group's points from its own generator (seed, step, global group id): the same on every
    process and however the samples are sharded. ``points_per_sample`` distinct steps of the
    ``grid_steps`` the sampler visits (sigma > 0), random per epoch."""
    groups, group_of = torch.unique(group_ids.cpu(), return_inverse=True)
    steps = torch.empty(epochs, len(groups), points_per_sample, dtype=torch.long)
    noise = torch.empty(epochs, len(groups), points_per_sample, *latent_shape)
    for gi, gid in enumerate(groups.tolist()):
        gen = torch.Generator().manual_seed(mix_seed(seed, step, 17, int(gid)))
        for e in range(epochs):
            steps[e, gi] = torch.randperm(grid_steps, generator=gen)[:points_per_sample]
            noise[e, gi] = torch.randn(points_per_sample, *latent_shape, generator=gen)
    return NftPoints(steps=steps.to(device), noise=noise.to(device), group_of=group_of.to(device))
