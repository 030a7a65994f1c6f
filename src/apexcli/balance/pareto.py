"""pareto: Pareto-dominance filtering inside each prompt group (our reading of Flow-Multi, 2026).

Flow-Multi (Lee & Choi, Sensors 26(4):1120, 2026) scores each sample with a reward vector,
removes the samples that another sample of the same group Pareto-dominates, updates the
policy on the non-dominated set only, and masks the advantages of low-reward samples. The
paper's text available to us does not give the advantage formula, the masking threshold or
how missing rewards are compared; docs/method/balancing.md lists the choices made here.
"""

from __future__ import annotations

import torch

from apexcli.balance.base import Balancer, Batch, Outcome
from apexcli.balance.normalize import batch_standardize


def dominated_in_groups(
    values: torch.Tensor, mask: torch.Tensor, gidx: torch.Tensor, active: torch.Tensor
) -> torch.Tensor:
    """[N] bool: sample i is dominated by a sample j of its own group.

    j dominates i when, over the ``active`` objectives finite for both, r_j >= r_i everywhere
    and r_j > r_i somewhere (maximisation). Pairs with no such objective in common are not
    comparable. Exact duplicates do not dominate each other.
    """
    n = values.shape[0]
    dominated = torch.zeros(n, dtype=torch.bool)
    for g in torch.unique(gidx):
        idx = torch.nonzero(gidx == g).flatten()
        v, m = values[idx][:, active], mask[idx][:, active]
        both = m[:, None, :] & m[None, :, :]  # [j, i, K]
        ge = (v[:, None, :] >= v[None, :, :]) | ~both
        gt = (v[:, None, :] > v[None, :, :]) & both
        dom = ge.all(2) & gt.any(2)  # [j, i]: j dominates i
        dominated[idx] = dom.any(0)
    return dominated


class ParetoBalancer(Balancer):
    """Dominance filter + low-reward suppression on gdpo advantages.

        z[i,k] = (r[i,k] - mean_g,k) / (std_g,k + eps)      (gdpo stage 1; 0 masked / flat)
        s_i    = sum_k w_k z[i,k]
        keep_i = i is not dominated within its group (objectives with w_k > 0)
                 and s_i > balance.pareto.min_score          (suppression; null = off)
        A      = standardize_batch(keep * s)

    A dropped sample gets A = 0 exactly, so it adds nothing to the policy-gradient term, and with
    ``balance.drop_zero_advantage`` (true unless set) the trainer leaves it out of the update altogether. Scale- and offset-invariant per
    reward (dominance and z both are); stateless apart from the step counter.
    """

    name = "pareto"
    drops_zero_by_default = True  # the filtered (A = 0) samples leave the update: masking, as Flow-Multi reads

    def _balance(self, batch: Batch) -> Outcome:
        z = self.gdpo_z(batch)
        w = self.user_weights
        s = (z * w).sum(1)
        dominated = dominated_in_groups(batch.values, batch.mask, batch.stats.group_index, w > 0)
        keep = ~dominated
        threshold = self.cfg.pareto.min_score
        suppressed = keep & (s <= threshold) if threshold is not None else torch.zeros_like(keep)
        keep = keep & ~suppressed
        contrib = z * w * keep.unsqueeze(1)
        adv = batch_standardize(torch.where(keep, s, torch.zeros_like(s)), self.eps)
        metrics = {
            "balance/pareto/dominated_frac": float(dominated.double().mean()),
            "balance/pareto/suppressed_frac": float(suppressed.double().mean()),
            "balance/pareto/kept_frac": float(keep.double().mean()),
        }
        return Outcome(adv, w.clone(), z, contrib, metrics)
