"""Pure normalization math: per-group statistics, z-scores, batch standardization.

All functions work in float64 on [N, K] reward matrices with a validity mask (non-finite
rewards are masked, never propagated). Notation: r[i,k] reward of sample i on objective k,
g(i) its group (prompt), mean_g,k / std_g,k the statistics of k's valid rewards in group g
(population std). A group is *flat* for k when it has fewer than two valid rewards or all its
valid rewards are exactly equal: it carries no within-group signal, and every normalizer
gives it advantage 0 there, whatever the denominator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TINY = 1e-30  # last-resort positive floor for a denominator (never reached by a non-flat group)


@dataclass
class GroupStats:
    """Per-group statistics of a masked reward matrix (G groups, K objectives)."""

    group_index: torch.Tensor  # [N] long, 0..G-1
    count: torch.Tensor  # [G, K] number of valid rewards
    mean: torch.Tensor  # [G, K] mean of valid rewards (0 where count == 0)
    std: torch.Tensor  # [G, K] population std of valid rewards (0 where count < 2)
    flat: torch.Tensor  # [G, K] bool: count < 2 or max == min

    @property
    def n_groups(self) -> int:
        return int(self.count.shape[0])


def group_index(groups: torch.Tensor) -> torch.Tensor:
    """Arbitrary group ids [N] -> dense indices 0..G-1 (ordered by id)."""
    _, inverse = torch.unique(groups.reshape(-1), sorted=True, return_inverse=True)
    return inverse


def group_statistics(values: torch.Tensor, mask: torch.Tensor, gidx: torch.Tensor) -> GroupStats:
    """Masked per-group count, mean, population std and flatness of ``values`` [N, K]."""
    n, k = values.shape
    g = int(gidx.max().item()) + 1 if n else 0
    m = mask.to(values.dtype)
    v = torch.where(mask, values, torch.zeros_like(values))
    count = torch.zeros(g, k, dtype=values.dtype).index_add_(0, gidx, m)
    total = torch.zeros(g, k, dtype=values.dtype).index_add_(0, gidx, v)
    mean = total / count.clamp(min=1)
    dev = (v - mean[gidx]) * m
    var = torch.zeros(g, k, dtype=values.dtype).index_add_(0, gidx, dev * dev) / count.clamp(min=1)
    std = var.clamp(min=0).sqrt()
    idx = gidx.unsqueeze(1).expand(n, k)
    inf = torch.full_like(values, float("inf"))
    gmax = torch.full((g, k), -float("inf"), dtype=values.dtype).scatter_reduce(
        0, idx, torch.where(mask, values, -inf), "amax"
    )
    gmin = torch.full((g, k), float("inf"), dtype=values.dtype).scatter_reduce(
        0, idx, torch.where(mask, values, inf), "amin"
    )
    flat = (count < 2) | (gmax <= gmin)
    std = torch.where(flat, torch.zeros_like(std), std)
    return GroupStats(gidx, count, mean, std, flat)


def masked_batch_moments(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch-level (all groups) count, mean and population std of each column's valid values."""
    m = mask.to(values.dtype)
    v = torch.where(mask, values, torch.zeros_like(values))
    count = m.sum(0)
    mean = v.sum(0) / count.clamp(min=1)
    var = (((v - mean) * m) ** 2).sum(0) / count.clamp(min=1)
    return count, mean, var.clamp(min=0).sqrt()


def group_zscores(
    values: torch.Tensor, mask: torch.Tensor, stats: GroupStats, denominator: torch.Tensor
) -> torch.Tensor:
    """z[i,k] = (r[i,k] - mean_g(i),k) / denominator[g(i),k]; 0 where masked or the group is flat for k."""
    gi = stats.group_index
    z = (values - stats.mean[gi]) / denominator[gi].clamp(min=TINY)
    keep = mask & ~stats.flat[gi]
    return torch.where(keep, z, torch.zeros_like(z))


def gdpo_denominator(stats: GroupStats, eps: float) -> torch.Tensor:
    """gdpo stage 1: std_g,k + eps."""
    return stats.std + eps


def dsan_denominator(stats: GroupStats, scale: torch.Tensor, rho: float) -> torch.Tensor:
    """DSAN stage 1: max(std_g,k, rho S_k), S_k [K] the running batch-level std of objective k."""
    return torch.maximum(stats.std, rho * scale.to(stats.std.dtype).unsqueeze(0))


def batch_standardize(s: torch.Tensor, eps: float) -> torch.Tensor:
    """Stage 2: s / (std_batch(s) + eps), with std taken about 0; all zeros when that std <= eps.

    Stage 1 centres every group (over its valid entries), so the batch mean of s is 0 by
    construction and this equals (s - mean(s)) / std(s) up to rounding; not subtracting the
    rounding-level mean keeps flat groups and single-sample groups at exactly 0.
    """
    if s.numel() == 0:
        return s
    sd = s.pow(2).mean().sqrt()
    if not torch.isfinite(sd) or sd <= eps:
        return torch.zeros_like(s)
    return s / (sd + eps)


def fill_masked_with_group_mean(values: torch.Tensor, mask: torch.Tensor, stats: GroupStats) -> torch.Tensor:
    """Replace each masked r[i,k] by a value that carries no signal for the weighted sum.

    The group mean of k's valid rewards when the group has any (so the sample is neither
    rewarded nor punished on k relative to its group); else the batch mean of k; else 0.
    """
    gi = stats.group_index
    _, batch_mean, _ = masked_batch_moments(values, mask)
    has_group = stats.count[gi] > 0
    fill = torch.where(has_group, stats.mean[gi], batch_mean.unsqueeze(0).expand_as(values))
    return torch.where(mask, values, fill)


def explained_share(contrib: torch.Tensor) -> torch.Tensor:
    """Share of the final advantage's variance explained by each objective.

    contrib [N, K] with A = sum_k contrib[:, k] (up to an affine map): share_k =
    cov(contrib_k, A) / var(A). The shares sum to 1; a negative share means k pulls against the
    rest. All zeros when A is constant.
    """
    total = contrib.sum(1)
    a = total - total.mean()
    var = (a * a).sum()
    if var <= 0 or not torch.isfinite(var):
        return torch.zeros(contrib.shape[1], dtype=contrib.dtype)
    c = contrib - contrib.mean(0, keepdim=True)
    return (c * a.unsqueeze(1)).sum(0) / var
