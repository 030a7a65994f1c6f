"""Typed configuration of the balancer (``balance.*`` in a run config).

Plain types and nested dataclasses only, so the run config loader can build it from YAML and
apply dotted overrides such as ``balance.apex.tau=0.5``. Each field declares what it accepts
beside it (``setting(...)``); the rules that relate fields (weights and targets against the
objectives) live with the run config's own (``apexcli.config.validate_balance``), and every
error names the dotted key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from apexcli.schema import setting

STRATEGIES = ("static", "gdpo", "apex", "dwa", "mgda", "random", "pareto")


@dataclass
class ApexConfig:
    """APEX = DSAN normalization + P³ priorities (docs/method/balancing.md)."""

    b_lp: float = setting(1.0, ge=0)
    """Coefficient of the learning-potential term LP_k (share of k's spread inside groups); 0 switches the term off."""
    b_cp: float = setting(1.0, ge=0)
    """Coefficient of the conflict-penalty term CP_k (mean negative cosine to the other objectives);
    0 switches the term off, and the gradient probe with it."""
    b_pn: float = setting(1.0, ge=0)
    """Coefficient of the progress-need term PN_k (1 for the most lagging objective, 0 for the leader);
    0 switches the term off, and the progress probe with it."""
    tau: float = setting(1.0, gt=0)
    """Softmax temperature of the priorities: w = K softmax(s / tau). Larger = closer to the user weights."""
    floor: float = setting(0.1, ge=0, le=1)
    """Fraction of the uniform weight mixed in, so every weight stays >= floor (weights sum to K)."""
    smoothing: float = setting(0.9, ge=0, lt=1)
    """EMA factor on the weights across steps: w_t = smoothing w_{t-1} + (1 - smoothing) w_target."""
    warmup: int = setting(10, ge=0)
    """Steps that use the user weights unchanged while the statistics (scales, progress) accumulate."""
    rho: float = setting(0.1, ge=0)
    """DSAN floor: the group std in stage 1 is replaced by max(std_g,k, rho S_k), S_k the running batch
    std; 0 = no floor: stage 1 is then gdpo's per-group z-score (std_g,k + balance.eps)."""
    ema_decay: float = setting(0.9, ge=0, lt=1)
    """Decay of the running batch std S_k and of the running mean reward used for progress."""
    targets: list[float] | None = None
    """Optional per-objective target rewards: progress becomes the fraction of the way from the start to T_k."""


@dataclass
class DwaConfig:
    """Dynamic Weight Average adapted to rewards (progress ratios instead of loss ratios)."""

    temperature: float = setting(1.0, gt=0)
    """Softmax temperature T: w = K softmax(log u - progress / T)."""
    ema_decay: float = setting(0.9, ge=0, lt=1)
    """Decay of the running mean reward whose step-to-step change measures progress."""


@dataclass
class MgdaConfig:
    """Multiple-gradient descent: min-norm convex combination of the probe's per-objective gradients."""

    iterations: int = setting(500, ge=1)
    """Projected-gradient iterations of the min-norm solve for K > 2 (K <= 2 is solved exactly)."""
    normalize: bool = False
    """Use unit gradients (the cosine matrix) instead of the raw Gram matrix."""


@dataclass
class RandomConfig:
    """Random weights: a fresh Dirichlet draw each step (a baseline for 'any adaptivity helps')."""

    seed: int = setting(0, ge=0, le=2**32 - 1)
    """Seed of the weight draws; draw t is a pure function of (seed, t), so resume is exact."""
    alpha: float = setting(1.0, gt=0)
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

    progress_prompts: int = setting(0, ge=0)
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
    weights: list[float] | None = setting(None, ge=0)
    """User priorities, one per objective (rescaled to sum to K; apex needs each > 0, the others allow
    0 for an objective only monitored); null = uniform."""
    std_scope: str = setting("global", choices=("global", "group"))
    """static only: divide by the std of the whole batch ("global", Flow-GRPO's SD3 configs) or of the group ("group"); the mean is always the group's."""
    eps: float | None = setting(None, gt=0)
    """Added to standard deviations and used as the tolerance of flat batches; null = the strategy's
    own: 1e-4 for static (Flow-GRPO's, added to the std of the weighted sum; its logged per-objective
    z-scores keep 1e-6), 1e-6 for the others."""
    drop_zero_advantage: bool | None = None
    """Leave samples whose advantage is exactly 0 out of the policy update (padded back with dropped
    samples to whole micro-batches), instead of paying KL and diluting the batch mean with them; null
    = the strategy's default: true for static (flat groups, as Flow-GRPO drops them) and pareto (the
    filtered samples, as masking reads in Flow-Multi), false for the others, whose flat groups are per
    objective (a sample flat on one objective still carries the others' signal)."""
    probe_every: int = setting(10, ge=0)
    """Gradient probe period in steps for apex (exact conflict term) and mgda; 0 = never (apex then uses the proxy)."""
    probe_samples: int = setting(4, ge=1)
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

    def validate(self, n_objectives: int | None = None) -> None:
        """Raise ApexError naming the dotted key of the first bad value (``n_objectives`` enables
        the per-objective length checks)."""
        from apexcli.config import validate_balance  # config.py nests this section: imported when used

        validate_balance(self, n_objectives)
