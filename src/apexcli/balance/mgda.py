"""mgda: weights = the min-norm convex combination of the per-objective policy gradients."""

from __future__ import annotations

import torch

from apexcli.balance.base import Balancer, Batch, Outcome, list_to_tensor, tensor_to_list
from apexcli.balance.config import BalanceConfig
from apexcli.balance.normalize import batch_standardize
from apexcli.balance.priorities import gram_to_cosine


def project_to_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection onto {x >= 0, sum x = 1} (sort-based; Held et al. 1974, Duchi et al. 2008)."""
    u, _ = torch.sort(v, descending=True)
    css = torch.cumsum(u, 0) - 1
    idx = torch.arange(1, v.numel() + 1, dtype=v.dtype)
    rho = int(torch.nonzero(u - css / idx > 0).max())
    theta = css[rho] / (rho + 1)
    return (v - theta).clamp(min=0)


def min_norm_simplex(gram: torch.Tensor, iterations: int = 500, tol: float = 1e-12) -> torch.Tensor:
    """lambda* = argmin_{lambda in simplex} lambda^T G lambda (Désidéri 2012; Sener & Koltun 2018).

    K = 1: [1]. K = 2: exact, lambda_1 = clip((G22 - G12) / (G11 + G22 - 2 G12), 0, 1) (1/2 when
    the two gradients are equal). K > 2: projected gradient descent from the uniform point with
    step 1 / (2 lambda_max(G)) (the objective's gradient is 2 G lambda), stopped when a step
    moves lambda by less than ``tol``. Projection reaches the faces exactly, where Frank–Wolfe
    would zigzag.
    """
    g = gram.to(torch.float64)
    g = 0.5 * (g + g.T)
    k = g.shape[0]
    if k == 1:
        return torch.ones(1, dtype=torch.float64)
    if k == 2:
        denom = g[0, 0] + g[1, 1] - 2 * g[0, 1]
        if denom <= 1e-300:
            lam1 = torch.tensor(0.5, dtype=torch.float64)
        else:
            lam1 = ((g[1, 1] - g[0, 1]) / denom).clamp(0.0, 1.0)
        return torch.stack([lam1, 1 - lam1])
    lam = torch.full((k,), 1.0 / k, dtype=torch.float64)
    top = float(torch.linalg.eigvalsh(g).max())
    if top <= 0:
        return lam  # all gradients zero: nothing to prefer
    step = 1.0 / (2 * top)
    for _ in range(iterations):
        nxt = project_to_simplex(lam - step * 2 * (g * lam).sum(1))
        moved = float((nxt - lam).abs().max())
        lam = nxt
        if moved < tol:
            break
    return lam


class MgdaBalancer(Balancer):
    """MGDA on gdpo-normalized advantages.

        g_k  = grad of the policy loss with advantages z[:,k]   (the probe, every probe_every steps)
        lam  = argmin_{lambda in simplex} |sum_k lambda_k g_k|^2,   w = K lam
        A    = standardize_batch(sum_k w_k z[:,k])

    Since the loss is linear in the advantages, A's gradient is the min-norm point's direction
    (up to scale). Weights are uniform before the first probe and held between probes.
    Cost: K backward passes every probe_every steps, plus O(NK) (the K x K solve is negligible).
    """

    name = "mgda"

    def __init__(self, objectives: list[str], cfg: BalanceConfig):
        super().__init__(objectives, cfg)
        self.weights = torch.ones(self.k, dtype=torch.float64)

    def wants_probe(self, step: int) -> bool:
        return self.k > 1 and self._probe_due(step)

    def set_gradient_gram(self, gram: torch.Tensor) -> None:
        g = self._checked_gram(gram)
        if g is None:
            return
        if self.cfg.mgda.normalize:
            g = gram_to_cosine(g)
        self.weights = self.k * min_norm_simplex(g, self.cfg.mgda.iterations)

    def _balance(self, batch: Batch) -> Outcome:
        z = self.gdpo_z(batch)
        w = self.weights.clone()
        contrib = z * w
        adv = batch_standardize(contrib.sum(1), self.eps)
        return Outcome(adv, w, z, contrib)

    def _extra_state(self) -> dict:
        return {"weights": tensor_to_list(self.weights)}

    def _load_extra_state(self, state: dict) -> None:
        self.weights = list_to_tensor(state["weights"])
