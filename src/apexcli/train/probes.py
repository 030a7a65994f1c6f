"""What the balancer measures besides the rewards: the per-objective gradient Gram of the policy
loss (``balance.probe_every``) and apex's progress probe (``balance.experimental.progress_prompts``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from apexcli.balance.probe import gradient_gram, gradient_gram_by_backward, spread_over_groups
from apexcli.config import Config
from apexcli.eval.evaluator import Evaluator
from apexcli.flow.rollout import PromptEmbeds, Trajectory
from apexcli.models.loading import attention_kernels
from apexcli.rewards import RewardSuite
from apexcli.seeds import mix_seed
from apexcli.train.losses import PolicyLoss

PROGRESS_NOISE_STREAM = -17  # mix_seed(seed, -17): the progress probe's noise; steps are >= 0, so no rollout shares it


def spread_prompts(prompts: list[str], n: int) -> list[str]:
    """``n`` prompts evenly spaced over the list (all of them when it is shorter)."""
    if n >= len(prompts):
        return list(prompts)
    return [prompts[(i * len(prompts)) // n] for i in range(n)]


class GradientProbe:
    """Per-objective policy gradients on a small sub-batch -> Gram ``[K, K]``, the same on every
    process (the Gram of the global gradients, not a mean of per-process Grams)."""

    def __init__(
        self,
        cfg: Config,
        policy_loss: PolicyLoss,
        model: torch.nn.Module,
        params: list[torch.nn.Parameter],
        accelerator: Accelerator,
        *,
        sharded: bool,
    ):
        """``model``: the transformer without DDP's wrapper (its hooks expect one backward per
        forward); FSDP2 shards in place, so there it is the sharded model and its gathers run."""
        self.cfg, self.policy_loss, self.model, self.params = cfg, policy_loss, model, params
        self.accelerator, self.sharded = accelerator, sharded

    def __call__(
        self, traj: Trajectory, per_objective: torch.Tensor, cond: PromptEmbeds, group_ids: torch.Tensor, step: int
    ) -> torch.Tensor:
        """``traj``, ``per_objective`` ``[n, K]``, ``cond`` and ``group_ids``: this process's samples."""
        rows = spread_over_groups(group_ids.tolist(), self.cfg.balance.probe_samples)
        sub = traj.index(rows)
        probe = self.policy_loss.probe_terms(self.model, sub, cond.index(rows).to(self.accelerator.device), step)
        advantages = per_objective[rows].to(self.accelerator.device)
        acc = self.accelerator
        if self.sharded:
            return gradient_gram_by_backward(
                lambda adv: (probe.weight(adv) * probe.terms()).mean(),
                advantages,
                self.params,
                all_reduce_sum=lambda g: acc.reduce(g, reduction="sum"),
            )
        reduce = (lambda g: acc.reduce(g, reduction="mean")) if acc.num_processes > 1 else None
        if self.cfg.model.compile:  # compiled backward passes cannot share one retained graph
            return gradient_gram(
                lambda adv: (probe.weight(adv) * probe.terms()).mean(),
                advantages,
                self.params,
                reduce=reduce,
                shared_graph=False,
            )
        terms = probe.terms()  # one forward, K backward passes
        return gradient_gram(lambda adv: (probe.weight(adv) * terms).mean(), advantages, self.params, reduce=reduce)


class ProgressProbe:
    """apex's progress probe: the live policy on fixed training prompts and noise (ODE, eval
    settings); every process gets the same means for its balancer."""

    def __init__(
        self,
        cfg: Config,
        pipe,
        cache,
        objectives: list[str],
        prompts: list[str],
        *,
        device: torch.device,
        accelerator: Accelerator,
        suite: RewardSuite,
    ):
        # training prompts, not the eval set: weights tuned on eval scores would leave no held-out eval
        self.cfg, self.objectives, self.accelerator = cfg, objectives, accelerator
        self.evaluator = Evaluator(
            cfg,
            pipe,
            cache,
            objectives,
            device=device,
            accelerator=accelerator,
            prompts=spread_prompts(prompts, cfg.balance.experimental.progress_prompts),
            seed=mix_seed(cfg.seed, PROGRESS_NOISE_STREAM),
            suite=suite,
        )

    @property
    def suite(self) -> RewardSuite:
        return self.evaluator.suite

    def __call__(
        self, model: torch.nn.Module, vae, scheduler, vae_scale_factor: int, step: int, *, lockstep: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` ``[K]`` float64 of each objective over the probe's prompts."""
        with attention_kernels(self.cfg.model.attention):
            row = self.evaluator.run(model, vae, scheduler, vae_scale_factor, step, None, lockstep=lockstep)
        if self.accelerator.num_processes > 1:
            row = broadcast_object_list([row])[0]  # only the main process gathered the scores
        return (
            torch.tensor(_column(row, self.objectives, "mean"), dtype=torch.float64),
            torch.tensor(_column(row, self.objectives, "std"), dtype=torch.float64),
        )


def _column(row: dict, objectives: Sequence[str], stat: str) -> list[float]:
    return [row[f"eval/{k}/{stat}"] for k in objectives]
