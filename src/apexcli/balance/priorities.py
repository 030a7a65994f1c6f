"""Pure P³ math (APEX priorities) and the weight maps shared by the adaptive strategies.

Our formulation (DESIGN §4); the paper names the three terms but publishes no equations.
"""

from __future__ import annotations

import torch

from apexcli.balance.normalize import GroupStats


def learning_potential(stats: GroupStats, scale: torch.Tensor) -> torch.Tensor:
    """LP_k = mean over groups with >= 2 valid rewards of std_g,k / S_k.

    The share of k's spread that lies inside groups, i.e. that GRPO can learn from now.
    0 when every group is flat for k, or when S_k is 0 (k never varied).
    """
    usable = (stats.count >= 2).to(stats.std.dtype)
    n_usable = usable.sum(0)
    mean_std = (stats.std * usable).sum(0) / n_usable.clamp(min=1)
    scale = scale.to(stats.std.dtype)
    ok = (scale > 0) & (n_usable > 0)
    return torch.where(ok, mean_std / scale.clamp(min=1e-300), torch.zeros_like(mean_std))


def cosine_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """Column cosines of ``vectors`` [N, K] -> [K, K]; rows/columns of all-zero columns are 0 (diagonal 1 otherwise)."""
    # elementwise, not a matmul: a tiny float64 GEMM can stall for milliseconds on threaded BLAS
    gram = (vectors.unsqueeze(2) * vectors.unsqueeze(1)).sum(0)
    return gram_to_cosine(gram)


def gram_to_cosine(gram: torch.Tensor) -> torch.Tensor:
    """Normalize a Gram matrix G[k,j] = <g_k, g_j> to cosines; a zero vector has cosine 0 with everything."""
    g = gram.to(torch.float64)
    norms = g.diagonal().clamp(min=0).sqrt()
    nz = norms > 0
    denom = torch.outer(norms, norms)
    cos = torch.where(torch.outer(nz, nz), g / denom.clamp(min=1e-300), torch.zeros_like(g))
    return cos.clamp(-1.0, 1.0)


def conflict_penalty(cos: torch.Tensor) -> torch.Tensor:
    """CP_k = mean_{j != k} max(0, -cos(k, j)); 0 when K == 1. Both sides of a conflict pay."""
    k = cos.shape[0]
    if k < 2:
        return torch.zeros(k, dtype=cos.dtype)
    neg = (-cos).clamp(min=0)
    neg = neg - torch.diag(torch.diagonal(neg))
    return neg.sum(1) / (k - 1)


def progress(
    mean_now: torch.Tensor, mean_start: torch.Tensor, scale_start: torch.Tensor, targets: torch.Tensor | None
) -> torch.Tensor:
    """p_k = (M_k(t) - M_k(0)) / S_k(0), or with targets (M_k(t) - M_k(0)) / (T_k - M_k(0)).

    A degenerate denominator (S_k(0) = 0, or the start already at the target) gives p_k = 0,
    resp. 1 (the target is reached).
    """
    delta = mean_now - mean_start
    if targets is None:
        ok = scale_start > 0
        return torch.where(ok, delta / scale_start.clamp(min=1e-300), torch.zeros_like(delta))
    span = targets.to(delta.dtype) - mean_start
    ok = span.abs() > 1e-12 * (1 + mean_start.abs())
    return torch.where(ok, delta / torch.where(ok, span, torch.ones_like(span)), torch.ones_like(delta))


def progress_need(p: torch.Tensor, active: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """PN_k = (max_j p_j - p_k) / (max_j p_j - min_j p_j + eps) over the active objectives (inactive: 0)."""
    if active is None:
        active = torch.ones_like(p, dtype=torch.bool)
    if not bool(active.any()):
        return torch.zeros_like(p)
    hi = p[active].max()
    lo = p[active].min()
    pn = (hi - p) / (hi - lo + eps)
    return torch.where(active, pn, torch.zeros_like(pn))


def softmax_weights(scores: torch.Tensor, tau: float) -> torch.Tensor:
    """w = K softmax(s / tau): positive weights summing to K."""
    k = scores.shape[0]
    return k * torch.softmax(scores / tau, dim=0)


def mix_floor(w: torch.Tensor, floor: float) -> torch.Tensor:
    """(1 - floor) w + floor: keeps the sum K and guarantees every weight >= floor."""
    return (1.0 - floor) * w + floor


def normalize_user_weights(weights: list[float] | None, k: int) -> torch.Tensor:
    """User weights rescaled to sum to K (uniform ones when None), float64."""
    if weights is None:
        return torch.ones(k, dtype=torch.float64)
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    return w * (k / w.sum())
