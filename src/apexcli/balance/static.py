"""static: weighted sum of rewards, then one GRPO normalization (APEX's foil, Flow-GRPO's recipe)."""

from __future__ import annotations

import torch

from apexcli.balance.base import DEFAULT_EPS, Balancer, Batch, Outcome
from apexcli.balance.normalize import fill_masked_with_group_mean, group_statistics

REFERENCE_TRAINING_SCALES = {"pick": 1 / 26, "deqa": 1 / 5}
"""Flow-GRPO trains on PickScore / 26 and DeQA / 5 (its scorers divide before ``multi_score``
sums); every other reward enters in its own units (aes ~5-6.5, ocr and the toy set in [0, 1])."""


class StaticBalancer(Balancer):
    """Linear scalarization (the reference's ``multi_score``).

        R_i = sum_k w_k c_k r[i,k]      w as given (default 1 each); c_k = REFERENCE_TRAINING_SCALES (else 1)
        A_i = (R_i - mean_g(i)(R)) / (std_batch(R) + eps)       std_scope = "global" (default)
        A_i = (R_i - mean_g(i)(R)) / (std_g(i)(R) + eps)        std_scope = "group"

    With its defaults (global std, eps 1e-4, ``static.reference_scales``) this is Flow-GRPO's SD3
    recipe, and ``drops_zero_advantage`` (``balance.drop_zero_advantage``, true unless set) tells
    the trainer to leave A = 0 samples out of the update as Flow-GRPO does. ``c_k = 1`` for every k when
    ``static.reference_scales`` is false.

    A group with a constant R gets A = 0. The effective weight of k is proportional to
    w_k std_k: the widest reward hijacks the signal. A masked (non-finite) r[i,k] is replaced by
    k's mean over the valid rewards of its group (else of the batch, else 0), so it is neither
    rewarded nor punished on k and cannot poison R. ``info["per_objective"]`` holds the gdpo
    group z-scores, as for every strategy.
    """

    name = "static"
    default_eps = 1e-4  # Flow-GRPO's, added to the std of the weighted sum R
    drops_zero_by_default = True

    def training_scales(self) -> torch.Tensor:
        """[K] float64: c_k, the factor each objective's reward is multiplied by before the sum."""
        table = REFERENCE_TRAINING_SCALES if self.cfg.static.reference_scales else {}
        return torch.tensor([table.get(name, 1.0) for name in self.objectives], dtype=torch.float64)

    def _balance(self, batch: Batch) -> Outcome:
        eps = self.eps
        # the weights as the user gave them (1 each by default), as multi_score sums them: a
        # rescaling would change the result through eps; the reported weights are normalized to K
        w = torch.tensor(self.cfg.weights or [1.0] * self.k, dtype=torch.float64)
        filled = fill_masked_with_group_mean(batch.values, batch.mask, batch.stats) * self.training_scales()
        total = (filled * w).sum(1, keepdim=True)
        all_valid = torch.ones_like(total, dtype=torch.bool)
        rs = group_statistics(total, all_valid, batch.stats.group_index)
        gi = rs.group_index
        if self.cfg.std_scope == "global":
            centred_all = total - total.mean()
            denom = centred_all.pow(2).mean().sqrt().expand(rs.n_groups, 1) + eps
        else:
            denom = rs.std + eps
        keep = ~rs.flat[gi]  # [N, 1]
        per_sample_denom = denom[gi]
        adv = torch.where(keep, (total - rs.mean[gi]) / per_sample_denom, torch.zeros_like(total)).squeeze(1)
        # Contribution of k: w_k (r_k - group mean of filled r_k) / the same denominator; they sum to A.
        fs = group_statistics(filled, torch.ones_like(batch.mask), gi)
        contrib = torch.where(keep, w * (filled - fs.mean[gi]) / per_sample_denom, torch.zeros_like(filled))
        # the per-objective z-scores (logged, and what the probe would read) keep the gdpo eps
        # unless balance.eps is set: static's own 1e-4 is for the std of R
        z = self.gdpo_z(batch, DEFAULT_EPS if self.cfg.eps is None else self.eps)
        return Outcome(adv, self.user_weights.clone(), z, contrib)
