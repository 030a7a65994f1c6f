"""The balancer interface shared by every strategy: input checks, masking, diagnostics, state.

    advantages, info = balancer(rewards [N, K], groups [N])
    info["weights"]       [K] float32, sums to K
    info["per_objective"] [N, K] float32: per-objective normalized advantages z (0 where masked)
    info["metrics"]       dict[str, float] (JSON-serialisable, finite)

A subclass implements ``_balance(batch) -> Outcome`` in float64 and its own state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from apexcli.balance.config import BalanceConfig
from apexcli.balance.normalize import (
    GroupStats,
    explained_share,
    gdpo_denominator,
    group_index,
    group_statistics,
    group_zscores,
    masked_batch_moments,
)
from apexcli.balance.priorities import conflict_penalty, cosine_matrix, learning_potential, normalize_user_weights
from apexcli.errors import ApexError


@dataclass
class Batch:
    """One step's rewards, prepared once: float64 values (masked entries set to 0), mask, group stats."""

    values: torch.Tensor  # [N, K] float64
    mask: torch.Tensor  # [N, K] bool: finite reward
    stats: GroupStats
    batch_count: torch.Tensor  # [K]
    batch_mean: torch.Tensor  # [K]
    batch_std: torch.Tensor  # [K]

    @property
    def n(self) -> int:
        return int(self.values.shape[0])

    @property
    def k(self) -> int:
        return int(self.values.shape[1])


@dataclass
class Outcome:
    """What a strategy computes for one batch (float64)."""

    advantages: torch.Tensor  # [N]
    weights: torch.Tensor  # [K], sums to K
    per_objective: torch.Tensor  # [N, K]
    contributions: torch.Tensor  # [N, K]: advantages == sum_k contributions[:, k] up to an affine map
    metrics: dict[str, float] = field(default_factory=dict)
    lp: torch.Tensor | None = None  # [K] when the strategy computes its own
    cp: torch.Tensor | None = None  # [K] when the strategy computes its own


def _finite_float(x) -> float:
    x = float(x)
    return x if math.isfinite(x) else 0.0


def tensor_to_list(t: torch.Tensor | None):
    """Float64 tensor -> nested python floats (exact, JSON- and weights_only-friendly)."""
    return None if t is None else t.detach().to(torch.float64).cpu().tolist()


def list_to_tensor(x) -> torch.Tensor | None:
    return None if x is None else torch.as_tensor(x, dtype=torch.float64)


DEFAULT_EPS = 1e-6
"""``balance.eps`` of every strategy but static, whose own is 1e-4 (Flow-GRPO's)."""


class Balancer:
    """Base of every strategy. Deterministic, CPU, stateful only through ``state_dict``."""

    name = "base"
    default_eps = DEFAULT_EPS
    """``balance.eps`` when the config leaves it null."""
    drops_zero_by_default = False
    """``balance.drop_zero_advantage`` when the config leaves it null."""

    def __init__(self, objectives: list[str], cfg: BalanceConfig):
        if not objectives:
            raise ApexError("balance needs at least one objective; pass --objectives a,b")
        if len(set(objectives)) != len(objectives):
            raise ApexError(f"balance objectives have duplicates: {list(objectives)}")
        cfg.validate(len(objectives))
        self.objectives = list(objectives)
        self.cfg = cfg
        self.k = len(objectives)
        self.user_weights = normalize_user_weights(cfg.weights, self.k)
        self.eps = cfg.eps if cfg.eps is not None else self.default_eps
        self.step = 0  # number of batches balanced so far

    @property
    def drops_zero_advantage(self) -> bool:
        """True when the trainer should leave zero-advantage samples out of the update
        (``balance.drop_zero_advantage``, else the strategy's default)."""
        dza = self.cfg.drop_zero_advantage
        return self.drops_zero_by_default if dza is None else dza

    # ---------------------------------------------------------------- probe hooks
    def wants_probe(self, step: int) -> bool:
        """True when this strategy needs the gradient Gram matrix at ``step`` (default: never)."""
        return False

    def set_gradient_gram(self, gram: torch.Tensor) -> None:
        """Receive the probe's Gram matrix [K, K]. Strategies that do not use it ignore it."""

    def wants_progress(self, step: int) -> bool:
        """True when this strategy wants the progress probe's mean rewards at ``step`` (default: never)."""
        return False

    def set_progress_means(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Receive the progress probe's per-objective mean and std [K] (NaN: no valid reward)."""

    def _probe_due(self, step: int) -> bool:
        every = self.cfg.probe_every
        return every > 0 and step % every == 0

    def _checked_gram(self, gram: torch.Tensor) -> torch.Tensor | None:
        g = torch.as_tensor(gram).detach().to("cpu", torch.float64)
        if g.shape != (self.k, self.k):
            raise ApexError(
                f"gradient Gram matrix has shape {tuple(g.shape)}, expected ({self.k}, {self.k}) for objectives {self.objectives}"
            )
        if not bool(torch.isfinite(g).all()):
            return None  # a failed probe (non-finite loss) is dropped, never propagated
        return 0.5 * (g + g.T)

    # ---------------------------------------------------------------- main entry
    def __call__(self, rewards: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, dict]:
        batch = self._prepare(rewards, groups)
        out = self._balance(batch)
        self.step += 1
        adv = torch.nan_to_num(out.advantages, nan=0.0, posinf=0.0, neginf=0.0).to(torch.float32)
        z = torch.nan_to_num(out.per_objective, nan=0.0, posinf=0.0, neginf=0.0).to(torch.float32)
        info = {
            "weights": out.weights.to(torch.float32),
            "per_objective": z,
            "metrics": self._metrics(batch, out, adv),
        }
        return adv, info

    def _balance(self, batch: Batch) -> Outcome:  # pragma: no cover - abstract
        raise TypeError(f"{type(self).__name__} must implement _balance")

    def _prepare(self, rewards: torch.Tensor, groups: torch.Tensor) -> Batch:
        r = torch.as_tensor(rewards).detach().to("cpu", torch.float64)
        if r.ndim == 1 and self.k == 1:
            r = r.unsqueeze(1)
        if r.ndim != 2 or r.shape[1] != self.k:
            raise ApexError(
                f"rewards have shape {tuple(r.shape)}, expected [N, {self.k}] for objectives {self.objectives}"
            )
        g = torch.as_tensor(groups).detach().to("cpu").reshape(-1)
        if g.shape[0] != r.shape[0]:
            raise ApexError(
                f"groups has {g.shape[0]} entries but rewards has {r.shape[0]} rows; give one group id per sample"
            )
        if r.shape[0] == 0:
            raise ApexError("balance got an empty batch (0 samples)")
        mask = torch.isfinite(r)
        values = torch.where(mask, r, torch.zeros_like(r))
        gidx = group_index(g.to(torch.long))
        stats = group_statistics(values, mask, gidx)
        count, mean, std = masked_batch_moments(values, mask)
        return Batch(values, mask, stats, count, mean, std)

    def gdpo_z(self, batch: Batch, eps: float | None = None) -> torch.Tensor:
        """Per-objective group z-scores (r - mean_g,k) / (std_g,k + eps), 0 when masked or flat
        (``eps``: this balancer's unless given)."""
        eps = self.eps if eps is None else eps
        return group_zscores(batch.values, batch.mask, batch.stats, gdpo_denominator(batch.stats, eps))

    # ---------------------------------------------------------------- diagnostics
    def _metrics(self, batch: Batch, out: Outcome, adv: torch.Tensor) -> dict[str, float]:
        share = explained_share(out.contributions)
        flat_frac = batch.stats.flat.to(torch.float64).mean(0)
        nan_frac = (~batch.mask).to(torch.float64).mean(0)
        lp = out.lp if out.lp is not None else learning_potential(batch.stats, batch.batch_std)
        cp = out.cp if out.cp is not None else conflict_penalty(cosine_matrix(out.per_objective))
        m: dict[str, float] = {}
        for i, name in enumerate(self.objectives):
            m[f"balance/weight/{name}"] = _finite_float(out.weights[i])
            m[f"balance/lp/{name}"] = _finite_float(lp[i])
            m[f"balance/cp/{name}"] = _finite_float(cp[i])
            m[f"balance/share/{name}"] = _finite_float(share[i])
            m[f"balance/flat_frac/{name}"] = _finite_float(flat_frac[i])
            m[f"balance/nan_frac/{name}"] = _finite_float(nan_frac[i])
        a = adv.to(torch.float64)
        m["balance/adv_std"] = _finite_float(a.std(unbiased=False)) if a.numel() else 0.0
        m["balance/adv_abs_max"] = _finite_float(a.abs().max()) if a.numel() else 0.0
        m["balance/step"] = float(self.step)
        for key, value in out.metrics.items():
            m[key] = _finite_float(value)
        return m

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Plain python values only (ints, floats, lists, bools, None): torch.save(weights_only) and JSON safe."""
        return {
            "strategy": self.name,
            "objectives": list(self.objectives),
            "step": int(self.step),
            **self._extra_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("strategy") != self.name:
            raise ApexError(
                f"balancer state is for strategy '{state.get('strategy')}', not '{self.name}'; resume with the same balance.strategy"
            )
        if list(state.get("objectives", [])) != self.objectives:
            raise ApexError(
                f"balancer state is for objectives {state.get('objectives')}, not {self.objectives}; resume with the same --objectives"
            )
        self.step = int(state["step"])
        self._load_extra_state(state)

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass
