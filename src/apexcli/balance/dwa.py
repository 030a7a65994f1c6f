"""dwa: Dynamic Weight Average (Liu et al., 2019) with reward progress in place of loss ratios."""

from __future__ import annotations

import torch

from apexcli.balance.base import Balancer, Batch, Outcome, list_to_tensor, tensor_to_list
from apexcli.balance.config import BalanceConfig
from apexcli.balance.normalize import batch_standardize
from apexcli.balance.priorities import softmax_weights


class DwaBalancer(Balancer):
    """DWA on gdpo-normalized advantages.

    DWA weights a loss by how slowly it fell: w_k ∝ exp(L_k(t-1) / L_k(t-2) / T). Rewards can
    be negative, so ratios are meaningless; we use the smoothed per-step progress in units of
    k's spread instead:

        M_k = EMA of the batch mean of k,   S_k = EMA of the batch std of k
        d_k = (M_k(t-1) - M_k(t-2)) / ((1 - decay) S_k)
        w   = K softmax(log u_k - d_k / T)         (user weights u for the first two steps)
        A   = standardize_batch(sum_k w_k z[:,k]),  z the gdpo group z-scores

    A slowly improving (or regressing) objective gets more weight. Cost: O(NK) per step.
    """

    name = "dwa"

    def __init__(self, objectives: list[str], cfg: BalanceConfig):
        super().__init__(objectives, cfg)
        k = self.k
        self.seen = torch.zeros(k, dtype=torch.bool)
        self.scale = torch.zeros(k, dtype=torch.float64)
        self.mean = torch.zeros(k, dtype=torch.float64)
        self.prev_mean = torch.zeros(k, dtype=torch.float64)
        self.has_prev = torch.zeros(k, dtype=torch.bool)

    def _balance(self, batch: Batch) -> Outcome:
        d_cfg = self.cfg.dwa
        # weights from the progress measured up to the previous step (t-1 vs t-2)
        ready = self.has_prev & (self.scale > 0)
        delta = (self.mean - self.prev_mean) / ((1 - d_cfg.ema_decay) * self.scale.clamp(min=1e-300))
        delta = torch.where(ready, delta, torch.zeros_like(delta))
        if bool(ready.any()):
            w = softmax_weights(self.user_weights.log() - delta / d_cfg.temperature, 1.0)
        else:
            w = self.user_weights.clone()
        z = self.gdpo_z(batch)
        contrib = z * w
        adv = batch_standardize(contrib.sum(1), self.eps)
        # then fold this batch into the running statistics
        decay = d_cfg.ema_decay
        ok = batch.batch_count >= 2
        first = ok & ~self.seen
        again = ok & self.seen
        self.prev_mean = torch.where(again, self.mean, self.prev_mean)
        self.has_prev = self.has_prev | again
        self.mean = torch.where(
            first, batch.batch_mean, torch.where(again, decay * self.mean + (1 - decay) * batch.batch_mean, self.mean)
        )
        self.scale = torch.where(
            first, batch.batch_std, torch.where(again, decay * self.scale + (1 - decay) * batch.batch_std, self.scale)
        )
        self.seen = self.seen | ok
        metrics = {f"balance/progress/{n}": float(delta[i]) for i, n in enumerate(self.objectives)}
        return Outcome(adv, w, z, contrib, metrics)

    def _extra_state(self) -> dict:
        return {
            "seen": [bool(x) for x in self.seen.tolist()],
            "has_prev": [bool(x) for x in self.has_prev.tolist()],
            "scale": tensor_to_list(self.scale),
            "mean": tensor_to_list(self.mean),
            "prev_mean": tensor_to_list(self.prev_mean),
        }

    def _load_extra_state(self, state: dict) -> None:
        self.seen = torch.tensor(state["seen"], dtype=torch.bool)
        self.has_prev = torch.tensor(state["has_prev"], dtype=torch.bool)
        self.scale = list_to_tensor(state["scale"])
        self.mean = list_to_tensor(state["mean"])
        self.prev_mean = list_to_tensor(state["prev_mean"])
