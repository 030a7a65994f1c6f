"""A synthetic multi-objective GRPO testbed: pure torch, seconds on CPU, no diffusion.

The policy is a Gaussian over a 2-D action, a ~ N(mu, sigma^2 I), with a learnable mean mu.
Each step draws ``groups`` prompts and ``group_size`` actions per prompt; every prompt adds
its own offset to each reward (prompt difficulty: between-group variance GRPO must ignore),
and every sample gets reward noise. The policy is trained with the GRPO-style policy
gradient  loss = -mean_i A_i log pi(a_i)  where A comes from any balancer.

The default task (``default_task``) has K = 3 rewards with heterogeneous scales and
variances and partly conflicting optima:

    loud    -30 |a - (2, 0)|^2      + noise std 15, prompt offset std 30   (wide, high variance)
    quiet   0.5 exp(-|a - (-1, 1)|^2 / 2) + noise std 0.02                (narrow, low variance)
    sparse  1[|a - (0, 1.5)| < 0.8]                                        (binary; mostly flat groups at first)

from mu0 = (0, -1), sigma = 0.5. The start lies outside the triangle of the three optima, so
moving up improves all three at first; further on they conflict. A linear sum of raw rewards
is dominated by ``loud`` (its spread is ~1000x the others'), which pulls mu to (2, 0), where
``quiet`` is worse than at the start and ``sparse`` never fires: variance hijacking.

Evaluation uses the noise-free expected reward J_k(mu) = E_a f_k(a), estimated with a fixed
set of standard-normal draws (common random numbers across strategies). Objectives are
normalized as  g_k = (J_k(mu) - J_k(mu0)) / (J_k(t_k) - J_k(mu0)),  so 0 is the initial policy
and 1 the best policy for k alone (t_k the optimum of f_k; for these radially decreasing
rewards the Gaussian's expectation peaks at mu = t_k). The hypervolume is taken in that
normalized, maximized space with the reference point at the origin = the initial policy's
point: a strategy earns volume only for checkpoints that improve every objective at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from apexcli.balance import build_balancer
from apexcli.balance.probe import gradient_gram


@dataclass
class ToyReward:
    """One synthetic reward f_k(a) plus its noise model."""

    name: str
    kind: str  # "quadratic": -scale |a-c|^2; "bump": scale exp(-|a-c|^2 / (2 width^2)); "hit": scale 1[|a-c| < width]
    center: tuple[float, float]
    scale: float = 1.0
    width: float = 1.0
    noise: float = 0.0  # std of per-sample Gaussian noise
    offset: float = 0.0  # std of the per-prompt offset (constant inside a group)

    def clean(self, a: torch.Tensor) -> torch.Tensor:
        """Noise-free reward of actions a [..., 2]."""
        d2 = (a - torch.tensor(self.center, dtype=a.dtype)).pow(2).sum(-1)
        if self.kind == "quadratic":
            return -self.scale * d2
        if self.kind == "bump":
            return self.scale * torch.exp(-d2 / (2 * self.width**2))
        if self.kind == "hit":
            return self.scale * (d2 < self.width**2).to(a.dtype)
        raise ValueError(f"unknown toy reward kind '{self.kind}'")


@dataclass
class ToyTask:
    """The policy's starting point and the K rewards."""

    rewards: list[ToyReward]
    init_mean: tuple[float, float] = (0.0, 0.0)
    sigma: float = 0.5

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rewards]


def default_task() -> ToyTask:
    """The K = 3 task described in the module docstring."""
    return ToyTask(
        rewards=[
            ToyReward("loud", "quadratic", (2.0, 0.0), scale=30.0, noise=15.0, offset=30.0),
            ToyReward("quiet", "bump", (-1.0, 1.0), scale=0.5, width=1.0, noise=0.02),
            ToyReward("sparse", "hit", (0.0, 1.5), scale=1.0, width=0.8),
        ],
        init_mean=(0.0, -1.0),
        sigma=0.5,
    )


@dataclass
class TrainSettings:
    """How the testbed trains one policy."""

    steps: int = 150  # optimizer steps
    groups: int = 8  # prompts per step
    group_size: int = 8  # samples per prompt
    lr: float = 0.05  # Adam learning rate on mu
    eval_every: int = 10  # checkpoints for the hypervolume (step 0 included)
    eval_samples: int = 4096  # Monte-Carlo draws for J_k


@dataclass
class TrainResult:
    """What one run produced: the normalized objectives at every checkpoint, and the weights."""

    strategy: str
    seed: int
    steps: list[int]
    points: torch.Tensor  # [C, K] normalized objectives g_k at each checkpoint
    raw: torch.Tensor  # [C, K] expected rewards J_k at each checkpoint
    weights: torch.Tensor  # [steps, K] balancer weights
    final_mean: torch.Tensor  # [2]
    probes: int = 0
    metrics: list[dict] = field(default_factory=list)

    @property
    def gains(self) -> torch.Tensor:
        """Normalized gain of every objective at the last checkpoint."""
        return self.points[-1]


class Evaluator:
    """J_k(mu) with fixed standard-normal draws; the normalization of DESIGN-free toy objectives."""

    def __init__(self, task: ToyTask, samples: int = 4096, seed: int = 12345):
        gen = torch.Generator().manual_seed(seed)
        self.task = task
        self.eps = torch.randn(samples, 2, generator=gen, dtype=torch.float64)
        mu0 = torch.tensor(task.init_mean, dtype=torch.float64)
        self.start = self.expected(mu0)
        self.best = torch.stack(
            [self._expected_one(r, torch.tensor(r.center, dtype=torch.float64)) for r in task.rewards]
        )

    def _expected_one(self, reward: ToyReward, mu: torch.Tensor) -> torch.Tensor:
        return reward.clean(mu + self.task.sigma * self.eps).mean()

    def expected(self, mu: torch.Tensor) -> torch.Tensor:
        """[K] noise-free expected rewards of the policy with mean mu."""
        mu = mu.detach().to(torch.float64)
        return torch.stack([self._expected_one(r, mu) for r in self.task.rewards])

    def normalized(self, raw: torch.Tensor) -> torch.Tensor:
        """(J - J(mu0)) / (J(t_k) - J(mu0)): 0 = start, 1 = the best policy for k alone."""
        return (raw - self.start) / (self.best - self.start)


def sample_rewards(
    task: ToyTask, actions: torch.Tensor, groups: torch.Tensor, n_groups: int, gen: torch.Generator
) -> torch.Tensor:
    """Noisy rewards [N, K] for actions [N, 2] (prompt offsets constant inside a group)."""
    cols = []
    for r in task.rewards:
        offsets = torch.randn(n_groups, generator=gen, dtype=actions.dtype) * r.offset
        noise = torch.randn(actions.shape[0], generator=gen, dtype=actions.dtype) * r.noise
        cols.append(r.clean(actions) + offsets[groups] + noise)
    return torch.stack(cols, 1)


def train_policy(
    task: ToyTask,
    strategy: str,
    seed: int,
    settings: TrainSettings | None = None,
    weights: list[float] | None = None,
    evaluator: Evaluator | None = None,
    **options,
) -> TrainResult:
    """Train the Gaussian policy with advantages from ``build_balancer(strategy, ...)``.

    The balancer's probe (apex exact CP, mgda) runs through ``gradient_gram`` on the whole
    batch whenever ``wants_probe(step)`` says so, exactly as the trainer wires it.
    """
    s = settings or TrainSettings()
    ev = evaluator or Evaluator(task, s.eval_samples)
    gen = torch.Generator().manual_seed(seed)
    mu = torch.tensor(task.init_mean, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([mu], lr=s.lr)
    balancer = build_balancer(strategy, task.names, weights=weights, **options)
    n = s.groups * s.group_size
    groups = torch.arange(s.groups).repeat_interleave(s.group_size)
    steps, raw, weight_rows, metrics = [0], [ev.expected(mu)], [], []
    probes = 0
    for step in range(s.steps):
        with torch.no_grad():
            actions = mu + task.sigma * torch.randn(n, 2, generator=gen, dtype=torch.float64)
        rewards = sample_rewards(task, actions, groups, s.groups, gen)
        adv, info = balancer(rewards, groups)

        def loss_for(a: torch.Tensor, actions: torch.Tensor = actions) -> torch.Tensor:
            logp = -((actions - mu) ** 2).sum(1) / (2 * task.sigma**2)  # log pi(a) up to a constant
            return -(a.to(logp.dtype) * logp).mean()

        if balancer.wants_probe(step):
            balancer.set_gradient_gram(gradient_gram(loss_for, info["per_objective"], [mu]))
            probes += 1
        opt.zero_grad()
        loss_for(adv).backward()
        opt.step()
        weight_rows.append(info["weights"])
        metrics.append(info["metrics"])
        if (step + 1) % s.eval_every == 0 or step + 1 == s.steps:
            steps.append(step + 1)
            raw.append(ev.expected(mu))
    raw_t = torch.stack(raw)
    return TrainResult(
        strategy=strategy,
        seed=seed,
        steps=steps,
        points=ev.normalized(raw_t),
        raw=raw_t,
        weights=torch.stack(weight_rows),
        final_mean=mu.detach().clone(),
        probes=probes,
        metrics=metrics,
    )


def hypervolume(points: torch.Tensor) -> float:
    """Hypervolume of normalized, maximized points [C, K] w.r.t. the origin (the initial policy)."""
    import moocore
    import numpy as np

    pts = points.detach().to(torch.float64).numpy()
    pts = pts[(pts > 0).all(1)]  # points that do not dominate the reference add nothing
    if len(pts) == 0:
        return 0.0
    return float(moocore.hypervolume(np.ascontiguousarray(pts), ref=np.zeros(pts.shape[1]), maximise=True))
