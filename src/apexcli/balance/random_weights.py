"""random: a fresh Dirichlet weight vector each step (the 'is adaptivity just noise?' baseline)."""

from __future__ import annotations

import numpy as np
import torch

from apexcli.balance.base import Balancer, Batch, Outcome
from apexcli.balance.normalize import batch_standardize


class RandomBalancer(Balancer):
    """Random weights on gdpo-normalized advantages.

        lam_t ~ Dirichlet(alpha 1_K), drawn from a generator seeded by (seed, t)
        w_t   = K (u * lam_t) / sum(u * lam_t)      (u = user weights)
        A     = standardize_batch(sum_k w_k z[:,k])

    Draw t is a pure function of (seed, t): the state is the step counter, resume is exact,
    and every rank draws the same weights. Cost: O(NK).
    """

    name = "random"

    def _draw(self, step: int) -> torch.Tensor:
        rc = self.cfg.random
        rng = np.random.default_rng([rc.seed, step])
        lam = torch.as_tensor(rng.dirichlet(np.full(self.k, rc.alpha)), dtype=torch.float64)
        w = self.user_weights * lam
        if not bool(torch.isfinite(w).all()) or w.sum() <= 0:  # alpha tiny: all mass underflowed
            return self.user_weights.clone()
        return w * (self.k / w.sum())

    def _balance(self, batch: Batch) -> Outcome:
        w = self._draw(self.step)
        z = self.gdpo_z(batch)
        contrib = z * w
        adv = batch_standardize(contrib.sum(1), self.eps)
        return Outcome(adv, w, z, contrib)
