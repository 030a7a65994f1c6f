"""gdpo: normalize each objective inside its group, then sum (arXiv 2601.05242)."""

from __future__ import annotations

from apexcli.balance.base import Balancer, Batch, Outcome
from apexcli.balance.normalize import batch_standardize


class GdpoBalancer(Balancer):
    """Normalize-then-sum.

        z[i,k] = (r[i,k] - mean_g,k) / (std_g,k + eps)      (0 where masked or the group is flat for k)
        A      = standardize_batch(sum_k w_k z[:,k])

    Invariant to each reward's scale and offset (up to eps); weights are the user's, fixed.
    """

    name = "gdpo"

    def _balance(self, batch: Batch) -> Outcome:
        z = self.gdpo_z(batch)
        w = self.user_weights
        contrib = z * w
        adv = batch_standardize(contrib.sum(1), self.eps)
        return Outcome(adv, w.clone(), z, contrib)
