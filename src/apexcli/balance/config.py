"""Typed configuration of the balancer (``balance.*`` in a run config).

Plain types and nested dataclasses only, so the run config loader can build it from YAML and
apply dotted overrides such as ``balance.apex.tau=0.5``. ``validate`` names the dotted key of
the first bad value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from apexcli.errors import ApexError
from apexcli.schema import setting

STRATEGIES = ("static", "gdpo", "apex", "dwa", "mgda", "random", "pareto")


@dataclass
class ApexConfig:
    """APEX = DSAN normalization + P³ priorities (docs/method/balancing.md)."""

    b_lp: float = 1.0
    """Coefficient of the learning-potential term LP_k (share of k's spread inside groups); 0 switches the term off."""
    b_cp: float = 1.0
    """Coefficient of the conflict-penalty term CP_k (mean negative cosine to the other objectives);
    0 switches the term off, and the gradient probe with it."""
    b_pn: float = 1.0
    """Coefficient of the progress-need term PN_k (1 for the most lagging objective, 0 for the leader);
    0 switches the term off, and the progress probe with it."""
    tau: float = 1.0
    """Softmax temperature of the priorities: w = K softmax(s / tau). Larger = closer to the user weights."""
    floor: float = 0.1
    """Fraction of the uniform weight mixed in, so every weight stays >= floor (weights sum to K)."""
    smoothing: float = 0.9
    """EMA factor on the weights across steps: w_t = smoothing w_{t-1} + (1 - smoothing) w_target."""
    warmup: int = 10
    """Steps that use the user weights unchanged while the statistics (scales, progress) accumulate."""
    rho: float = 0.1
    """DSAN floor: the group std in stage 1 is replaced by max(std_g,k, rho S_k), S_k the running batch
    std; 0 = no floor: stage 1 is then gdpo's per-group z-score (std_g,k + balance.eps)."""
    ema_decay: float = 0.9
    """Decay of the running batch std S_k and of the running mean reward used for progress."""
    targets: list[float] | None = None
    """Optional per-objective target rewards: progress becomes the fraction of the way from the start to T_k."""


@dataclass
class DwaConfig:
    """Dynamic Weight Average adapted to rewards (progress ratios instead of loss ratios)."""

    temperature: float = 1.0
    """Softmax temperature T: w = K softmax(log u - progress / T)."""
    ema_decay: float = 0.9
    """Decay of the running mean reward whose step-to-step change measures progress."""


@dataclass
class MgdaConfig:
    """Multiple-gradient descent: min-norm convex combination of the probe's per-objective gradients."""

    iterations: int = 500
    """Projected-gradient iterations of the min-norm solve for K > 2 (K <= 2 is solved exactly)."""
    normalize: bool = False
    """Use unit gradients (the cosine matrix) instead of the raw Gram matrix."""


@dataclass
class RandomConfig:
    """Random weights: a fresh Dirichlet draw each step (a baseline for 'any adaptivity helps')."""

    seed: int = 0
    """Seed of the weight draws; draw t is a pure function of (seed, t), so resume is exact."""
    alpha: float = 1.0
    """Dirichlet concentration (1 = uniform over the simplex; large = close to the user weights)."""


@dataclass
class StaticConfig:
    """static = Flow-GRPO's ``multi_score`` + per-prompt advantages; the defaults reproduce its SD3
    recipe (with balance.eps and balance.drop_zero_advantage left null)."""

    reference_scales: bool = True
    """Divide pick by 26 and deqa by 5 before the weighted sum, as Flow-GRPO trains on them; other rewards
    keep their units. Logged rewards, eval, score and pareto stay in raw units either way."""


@dataclass
class ParetoConfig:
    """Pareto-dominance filtering inside each prompt group (Flow-Multi, 2026; docs/method/balancing.md)."""

    min_score: float | None = 0.0
    """Low-reward suppression: a non-dominated sample keeps its advantage only when its combined group z-score sum_k w_k z_k exceeds this; null = keep every non-dominated sample."""


@dataclass
class BalanceExperimental:
    """Research settings of the balancer, ours, measured only on the small ``mini`` preset
    (docs/method/extensions.md); a run that changes one says so when it starts."""

    progress_prompts: int = 0
    """apex: training prompts (spread over the list) sampled every probe_every steps with fixed noise and the
    ODE sampler, whose mean rewards measure progress p_k; 0 = the running mean of the training batches, which
    follows which prompts were drawn as much as the policy. Measured on mini at 16 (its preset): ocr, which
    lags, gets weight 1.3-1.7; no eval change beyond noise at 10 updates
    (docs/experiments/2026-12-01-apex-vs-static-60-updates.md)."""


@dataclass
class BalanceConfig:
    """How K rewards become one GRPO advantage per sample."""

    strategy: str = setting("apex", choices=STRATEGIES, resume="refuse")
    """One of static, gdpo, apex, dwa, mgda, random, pareto."""
    weights: list[float] | None = None
    """User priorities, one per objective (rescaled to sum to K); null = uniform."""
    std_scope: str = "global"
    """static only: divide by the std of the whole batch ("global", Flow-GRPO's SD3 configs) or of the group ("group"); the mean is always the group's."""
    eps: float | None = None
    """Added to standard deviations and used as the tolerance of flat batches; null = the strategy's
    own: 1e-4 for static (Flow-GRPO's, added to the std of the weighted sum; its logged per-objective
    z-scores keep 1e-6), 1e-6 for the others."""
    drop_zero_advantage: bool | None = None
    """Leave samples whose advantage is exactly 0 out of the policy update (padded back with dropped
    samples to whole micro-batches), instead of paying KL and diluting the batch mean with them; null
    = the strategy's default: true for static (flat groups, as Flow-GRPO drops them) and pareto (the
    filtered samples, as masking reads in Flow-Multi), false for the others, whose flat groups are per
    objective (a sample flat on one objective still carries the others' signal)."""
    probe_every: int = 10
    """Gradient probe period in steps for apex (exact conflict term) and mgda; 0 = never (apex then uses the proxy)."""
    probe_samples: int = 4
    """Samples of the sub-batch the gradient probe backpropagates through (one sampled timestep), taken round-robin over the step's prompts."""
    apex: ApexConfig = field(default_factory=ApexConfig)
    """APEX options (balance.apex.*)."""
    dwa: DwaConfig = field(default_factory=DwaConfig)
    """DWA options (balance.dwa.*)."""
    mgda: MgdaConfig = field(default_factory=MgdaConfig)
    """MGDA options (balance.mgda.*)."""
    random: RandomConfig = field(default_factory=RandomConfig)
    """Random-weights options (balance.random.*)."""
    static: StaticConfig = field(default_factory=StaticConfig)
    """static options (balance.static.*)."""
    pareto: ParetoConfig = field(default_factory=ParetoConfig)
    """Pareto-filter options (balance.pareto.*)."""
    experimental: BalanceExperimental = field(default_factory=BalanceExperimental)
    """Research settings of the balancer (balance.experimental.*)."""

    def validate(self, n_objectives: int | None = None, prefix: str = "balance") -> None:
        """Raise ApexError naming the dotted key of the first bad value."""
        validate_balance_config(self, n_objectives, prefix)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ApexError(f"{key} {message}")


def validate_balance_config(cfg: BalanceConfig, n_objectives: int | None = None, prefix: str = "balance") -> None:
    """Semantic checks of a BalanceConfig; ``n_objectives`` enables the per-objective length checks."""
    p = prefix
    _check(
        cfg.strategy in STRATEGIES,
        f"{p}.strategy",
        f"must be one of {', '.join(STRATEGIES)}, got '{cfg.strategy}'",
    )
    if cfg.weights is not None:
        w = list(cfg.weights)
        if n_objectives is not None:
            _check(
                len(w) == n_objectives,
                f"{p}.weights",
                f"has {len(w)} values but there are {n_objectives} objectives; give one weight per objective",
            )
        _check(all(_finite(x) and x >= 0 for x in w), f"{p}.weights", f"must be finite and >= 0, got {w}")
        _check(sum(w) > 0, f"{p}.weights", f"must not all be 0, got {w}")
        if cfg.strategy == "apex":
            _check(all(x > 0 for x in w), f"{p}.weights", f"must be > 0 for apex (they enter as log-priors), got {w}")
    _check(cfg.std_scope in ("group", "global"), f"{p}.std_scope", f"must be group or global, got '{cfg.std_scope}'")
    _check(cfg.eps is None or (_finite(cfg.eps) and cfg.eps > 0), f"{p}.eps", f"must be > 0, got {cfg.eps}")
    _check(isinstance(cfg.probe_every, int) and cfg.probe_every >= 0, f"{p}.probe_every", f"must be an integer >= 0, got {cfg.probe_every}")
    _check(isinstance(cfg.probe_samples, int) and cfg.probe_samples >= 1, f"{p}.probe_samples", f"must be an integer >= 1, got {cfg.probe_samples}")
    pp = cfg.experimental.progress_prompts
    _check(isinstance(pp, int) and pp >= 0, f"{p}.experimental.progress_prompts", f"must be an integer >= 0, got {pp}")
    _check(
        pp == 0 or cfg.probe_every > 0,
        f"{p}.experimental.progress_prompts",
        f"needs {p}.probe_every > 0 (its period), got probe_every {cfg.probe_every}; set one or progress_prompts=0",
    )

    a, q = cfg.apex, f"{p}.apex"
    for name in ("b_lp", "b_cp", "b_pn"):
        v = getattr(a, name)
        _check(_finite(v) and v >= 0, f"{q}.{name}", f"must be >= 0, got {v}")
    _check(_finite(a.tau) and a.tau > 0, f"{q}.tau", f"must be > 0, got {a.tau}")
    _check(_finite(a.floor) and 0 <= a.floor <= 1, f"{q}.floor", f"must be in [0, 1], got {a.floor}")
    _check(_finite(a.smoothing) and 0 <= a.smoothing < 1, f"{q}.smoothing", f"must be in [0, 1), got {a.smoothing}")
    _check(isinstance(a.warmup, int) and a.warmup >= 0, f"{q}.warmup", f"must be an integer >= 0, got {a.warmup}")
    _check(_finite(a.rho) and a.rho >= 0, f"{q}.rho", f"must be >= 0, got {a.rho}")
    _check(_finite(a.ema_decay) and 0 <= a.ema_decay < 1, f"{q}.ema_decay", f"must be in [0, 1), got {a.ema_decay}")
    if a.targets is not None:
        if n_objectives is not None:
            _check(
                len(a.targets) == n_objectives,
                f"{q}.targets",
                f"has {len(a.targets)} values but there are {n_objectives} objectives; give one target per objective",
            )
        _check(all(_finite(t) for t in a.targets), f"{q}.targets", f"must be finite numbers, got {a.targets}")

    d = cfg.dwa
    _check(_finite(d.temperature) and d.temperature > 0, f"{p}.dwa.temperature", f"must be > 0, got {d.temperature}")
    _check(_finite(d.ema_decay) and 0 <= d.ema_decay < 1, f"{p}.dwa.ema_decay", f"must be in [0, 1), got {d.ema_decay}")
    m = cfg.mgda
    _check(isinstance(m.iterations, int) and m.iterations >= 1, f"{p}.mgda.iterations", f"must be an integer >= 1, got {m.iterations}")
    r = cfg.random
    _check(isinstance(r.seed, int) and r.seed >= 0, f"{p}.random.seed", f"must be an integer >= 0, got {r.seed}")
    _check(_finite(r.alpha) and r.alpha > 0, f"{p}.random.alpha", f"must be > 0, got {r.alpha}")
    ms = cfg.pareto.min_score
    _check(ms is None or _finite(ms), f"{p}.pareto.min_score", f"must be a finite number or null, got {ms}")
