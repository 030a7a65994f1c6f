"""apex: Dual-Stage Adaptive Normalization (DSAN) + P³ adaptive priorities (our formulation)."""

from __future__ import annotations

import torch

from apexcli.balance.base import Balancer, Batch, Outcome, list_to_tensor, tensor_to_list
from apexcli.balance.config import BalanceConfig
from apexcli.balance.normalize import batch_standardize, dsan_denominator, group_zscores
from apexcli.balance.priorities import (
    conflict_penalty,
    cosine_matrix,
    gram_to_cosine,
    learning_potential,
    mix_floor,
    progress,
    progress_need,
    softmax_weights,
)


class ApexBalancer(Balancer):
    """DSAN + P³ (DESIGN §4).

    Running statistics per objective k (updated from each batch with >= 2 valid rewards of k):
    S_k = EMA of the batch std of k, M_k = EMA of the batch mean of k; M_k(0) the first batch
    mean, S_k(0) the first positive batch std (p_k = 0 until k has varied once).

    DSAN stage 1:  z[i,k] = (r[i,k] - mean_g,k) / max(std_g,k, rho S_k)   (0 if masked or flat)
    DSAN stage 2:  A = standardize_batch(sum_k w_k z[:,k])
    (``rho`` = 0: no floor, stage 1 is gdpo's (r - mean_g,k) / (std_g,k + eps).)

    P³ priorities:
        LP_k = mean_g std_g,k / S_k                           learning potential
        CP_k = mean_{j!=k} max(0, -cos(k, j))                 conflict penalty; cos from the
               probe's gradient Gram on the step after a probe, else cos(z_k, z_j) over the batch
        p_k  = (M_k - M_k(0)) / S_k(0)   [or (M_k - M_k(0)) / (T_k - M_k(0)) with targets]
               with ``experimental.progress_prompts`` > 0, M_k and S_k(0) are the progress probe's mean and
               first std instead: the same prompts and noise every time, so p_k follows the policy
        PN_k = (max_j p_j - p_k) / (max_j p_j - min_j p_j + eps)   progress need
        s_k  = log u_k + b_L LP_k + b_N PN_k - b_C CP_k       (u = user weights, sum K;
                                                                a coefficient 0 switches its term off)
        w*   = (1 - floor) K softmax(s / tau) + floor
        w_t  = smoothing w_{t-1} + (1 - smoothing) w*         (w_t = u during the first ``warmup`` steps)

    Every quantity is a ratio of spreads or a cosine, so A is invariant to each reward's scale
    and offset. Cost: O(NK + K^2) per step, plus the optional probe (K backward passes).
    """

    name = "apex"

    def __init__(self, objectives: list[str], cfg: BalanceConfig):
        super().__init__(objectives, cfg)
        k = self.k
        self.seen = torch.zeros(k, dtype=torch.bool)
        self.scale = torch.zeros(k, dtype=torch.float64)
        self.scale0 = torch.zeros(k, dtype=torch.float64)
        self.mean = torch.zeros(k, dtype=torch.float64)
        self.mean0 = torch.zeros(k, dtype=torch.float64)
        self.weights = self.user_weights.clone()
        self.pending_gram: torch.Tensor | None = None
        # the progress probe's readings (used for p_k when cfg.experimental.progress_prompts > 0)
        self.probe_seen = torch.zeros(k, dtype=torch.bool)
        self.probe_mean = torch.zeros(k, dtype=torch.float64)
        self.probe_mean0 = torch.zeros(k, dtype=torch.float64)
        self.probe_scale0 = torch.zeros(k, dtype=torch.float64)

    # ------------------------------------------------------------------ probe
    def wants_probe(self, step: int) -> bool:
        a = self.cfg.apex
        return self.k > 1 and a.b_cp > 0 and self._probe_due(step)

    def set_gradient_gram(self, gram: torch.Tensor) -> None:
        g = self._checked_gram(gram)
        if g is not None:
            self.pending_gram = g

    def wants_progress(self, step: int) -> bool:
        return (
            self.k > 1
            and self.cfg.experimental.progress_prompts > 0
            and self.cfg.apex.b_pn > 0
            and self._probe_due(step)
        )  # one objective has no need relative to others

    def set_progress_means(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        m = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
        s = torch.as_tensor(std, dtype=torch.float64).reshape(-1)
        if m.shape != (self.k,) or s.shape != (self.k,):
            raise ValueError(f"progress means/stds need shape ({self.k},), got {tuple(m.shape)} and {tuple(s.shape)}")
        ok = torch.isfinite(m) & torch.isfinite(s)
        first = ok & ~self.probe_seen
        self.probe_mean0 = torch.where(first, m, self.probe_mean0)
        self.probe_scale0 = torch.where(first, s, self.probe_scale0)
        self.probe_mean = torch.where(ok, m, self.probe_mean)
        self.probe_seen = self.probe_seen | ok

    # ------------------------------------------------------------------ step
    def _update_running(self, batch: Batch) -> None:
        d = self.cfg.apex.ema_decay
        ok = batch.batch_count >= 2
        first = ok & ~self.seen
        again = ok & self.seen
        # S_k(0) is the first *positive* batch std: an objective that starts flat (all OCR scores
        # 0) has no unit of progress until it first varies, and meanwhile reports progress 0.
        self.scale0 = torch.where(ok & (self.scale0 <= 0), batch.batch_std, self.scale0)
        self.mean0 = torch.where(first, batch.batch_mean, self.mean0)
        self.scale = torch.where(
            first, batch.batch_std, torch.where(again, d * self.scale + (1 - d) * batch.batch_std, self.scale)
        )
        self.mean = torch.where(
            first, batch.batch_mean, torch.where(again, d * self.mean + (1 - d) * batch.batch_mean, self.mean)
        )
        self.seen = self.seen | ok

    def _balance(self, batch: Batch) -> Outcome:
        a = self.cfg.apex
        self._update_running(batch)
        stats = batch.stats
        if a.rho > 0:
            z = group_zscores(batch.values, batch.mask, stats, dsan_denominator(stats, self.scale, a.rho))
        else:  # no floor: a group's own std, + eps so a near-flat group stays bounded
            z = self.gdpo_z(batch)

        lp = learning_potential(stats, self.scale)
        exact = self.pending_gram is not None
        cos = gram_to_cosine(self.pending_gram) if exact else cosine_matrix(z)
        self.pending_gram = None  # an exact Gram serves the step right after its probe
        targets = None if a.targets is None else torch.tensor(a.targets, dtype=torch.float64)
        if self.cfg.experimental.progress_prompts > 0:
            measured = self.probe_seen
            p = progress(self.probe_mean, self.probe_mean0, self.probe_scale0, targets)
        else:
            measured = self.seen
            p = progress(self.mean, self.mean0, self.scale0, targets)
        p = torch.where(measured, p, torch.zeros_like(p))
        pn = progress_need(p, measured, self.eps)
        cp = conflict_penalty(cos)

        if self.step < a.warmup:
            w = self.user_weights.clone()
        else:
            s = self.user_weights.log() + a.b_lp * lp + a.b_pn * pn - a.b_cp * cp
            target = mix_floor(softmax_weights(s, a.tau), a.floor)
            w = a.smoothing * self.weights + (1 - a.smoothing) * target
            w = w * (self.k / w.sum())  # guard the sum against rounding drift
        self.weights = w

        contrib = z * w
        adv = batch_standardize(contrib.sum(1), self.eps)
        metrics = {"balance/cp_exact": 1.0 if exact else 0.0}
        for i, name in enumerate(self.objectives):
            metrics[f"balance/pn/{name}"] = float(pn[i])
            metrics[f"balance/progress/{name}"] = float(p[i])
            metrics[f"balance/scale/{name}"] = float(self.scale[i])
            for j in range(i + 1, self.k):  # the cosines CP read (exact on cp_exact steps)
                metrics[f"balance/cos/{name},{self.objectives[j]}"] = float(cos[i, j])
        return Outcome(adv, w.clone(), z, contrib, metrics, lp=lp, cp=cp)

    # ------------------------------------------------------------------ state
    def _extra_state(self) -> dict:
        return {
            "seen": [bool(x) for x in self.seen.tolist()],
            "scale": tensor_to_list(self.scale),
            "scale0": tensor_to_list(self.scale0),
            "mean": tensor_to_list(self.mean),
            "mean0": tensor_to_list(self.mean0),
            "weights": tensor_to_list(self.weights),
            "pending_gram": tensor_to_list(self.pending_gram),
            "probe_seen": [bool(x) for x in self.probe_seen.tolist()],
            "probe_mean": tensor_to_list(self.probe_mean),
            "probe_mean0": tensor_to_list(self.probe_mean0),
            "probe_scale0": tensor_to_list(self.probe_scale0),
        }

    def _load_extra_state(self, state: dict) -> None:
        self.seen = torch.tensor(state["seen"], dtype=torch.bool)
        self.scale = list_to_tensor(state["scale"])
        self.scale0 = list_to_tensor(state["scale0"])
        self.mean = list_to_tensor(state["mean"])
        self.mean0 = list_to_tensor(state["mean0"])
        self.weights = list_to_tensor(state["weights"])
        self.pending_gram = list_to_tensor(state.get("pending_gram"))
        if "probe_seen" in state:  # absent in checkpoints from before the progress probe
            self.probe_seen = torch.tensor(state["probe_seen"], dtype=torch.bool)
            self.probe_mean = list_to_tensor(state["probe_mean"])
            self.probe_mean0 = list_to_tensor(state["probe_mean0"])
            self.probe_scale0 = list_to_tensor(state["probe_scale0"])
