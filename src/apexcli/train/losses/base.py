"""What a policy loss provides to the shared update loop and to the gradient probe.

A loss turns this process's rollout and advantages into a scalar per micro-batch: it prepares
what it needs from the rollout once per update (``prepare``), may draw per-epoch randomness
from the epoch's generator after the loop has drawn the sample order (``begin_epoch``), and
returns each micro-batch's loss with its statistics (``loss``). The loop owns everything else
(accumulation, ``no_sync``, clipping, stepping, reductions), so a new loss touches no loop code.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from apexcli.config import Config
from apexcli.flow.rollout import PromptEmbeds, Trajectory, predict_velocity, step_log_prob
from apexcli.flow.sde import StepOutput
from apexcli.models.lora import adapters_disabled

Reduction = Literal["mean", "first", "max"]
"""How the loop folds a statistic over an update's micro-batches and processes: the mean of
both; the first micro-batch's value on this process; the largest value anywhere."""


@dataclass(frozen=True)
class PolicyModels:
    """The networks a loss evaluates, and the guidance every forward uses."""

    policy: torch.nn.Module
    """The prepared transformer (DDP or FSDP wrapper): the update's forwards and backwards."""
    reference: torch.nn.Module
    """The unwrapped transformer: with ``adapters`` off it is the base model."""
    adapters: list[torch.nn.Module]
    guidance_scale: float
    uncond: PromptEmbeds
    true_cfg_scale: float = 1.0
    """FLUX's true CFG (``sampling.true_cfg_scale``); 1 = off."""

    def velocity(
        self, model: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: PromptEmbeds
    ) -> torch.Tensor:
        return predict_velocity(
            model,
            x,
            sigma,
            cond,
            guidance_scale=self.guidance_scale,
            uncond=self.uncond,
            true_cfg_scale=self.true_cfg_scale,
        )

    def log_prob(
        self,
        model: torch.nn.Module,
        traj: Trajectory,
        x: torch.Tensor,
        x_next: torch.Tensor,
        sigma: float | torch.Tensor,
        sigma_next: float | torch.Tensor,
        cond: PromptEmbeds,
    ) -> StepOutput:
        return step_log_prob(
            model,
            x,
            x_next,
            sigma,
            sigma_next,
            cond,
            guidance_scale=self.guidance_scale,
            uncond=self.uncond,
            true_cfg_scale=self.true_cfg_scale,
            **traj.step_options,
        )

    @torch.no_grad()
    def base_velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: PromptEmbeds) -> torch.Tensor:
        with adapters_disabled(self.adapters):
            return self.velocity(self.reference, x, sigma, cond)

    @torch.no_grad()
    def base_log_prob(
        self,
        traj: Trajectory,
        x: torch.Tensor,
        x_next: torch.Tensor,
        sigma: torch.Tensor,
        sigma_next: torch.Tensor,
        cond: PromptEmbeds,
    ) -> StepOutput:
        with adapters_disabled(self.adapters):
            return self.log_prob(self.reference, traj, x, x_next, sigma, sigma_next, cond)


@dataclass(frozen=True)
class UpdateBatch:
    """This process's samples of one update, as every loss reads them."""

    traj: Trajectory
    sigmas: torch.Tensor
    """The rollout's noise levels on the latents' device."""
    cond: PromptEmbeds
    """Each sample's prompt embedding, on the device."""
    advantages: torch.Tensor
    """``[n]`` clipped advantages, on the device."""
    group_ids: torch.Tensor | None
    """``[n]`` global group of each sample (None: each sample its own group)."""
    step: int
    """The training update: seeds the loss's own draws."""


@dataclass(frozen=True)
class MicroBatch:
    """The samples of one backward pass: ``rows`` of the batch at their ``point``-th trained term."""

    epoch: int
    rows: torch.Tensor
    point: int
    cond: PromptEmbeds
    advantages: torch.Tensor


@dataclass(frozen=True)
class ProbeTerms:
    """The probe's per-objective gradient is ``grad mean(weight(A_k) * terms())``; ``terms`` is
    differentiable and may be evaluated once and reused for every objective."""

    terms: Callable[[], torch.Tensor]
    weight: Callable[[torch.Tensor], torch.Tensor]


class PolicyLoss(ABC):
    """One ``train.loss``; the update loop and the gradient probe call only these methods."""

    reductions: ClassVar[Mapping[str, Reduction]] = {}
    """Statistics that are not means over the update (the loop takes the mean of the others)."""

    def __init__(self, cfg: Config, models: PolicyModels, steps_trained: list[int]):
        self.cfg = cfg
        self.models = models
        self.steps_trained = steps_trained

    @property
    @abstractmethod
    def points_per_sample(self) -> int:
        """Loss terms per sample and epoch, each its own forward and backward."""

    def prepare(self, batch: UpdateBatch, *, on_policy: bool) -> None:
        """Once per update, before the policy trains; ``on_policy``: one optimizer step over one
        epoch, so the policy stays the rollout's at every micro-batch."""
        self.batch = batch

    def begin_epoch(self, epoch: int, generator: torch.Generator) -> None:  # noqa: B027  (a hook: GRPO draws nothing)
        """Per-epoch draws, from the generator the loop just drew the epoch's sample order from."""

    @abstractmethod
    def loss(self, micro: MicroBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The micro-batch's loss (before the loop divides it over the accumulated passes) and its
        statistics, each a detached scalar tensor (kept on the device until the update ends)."""

    @abstractmethod
    def probe_terms(self, model: torch.nn.Module, traj: Trajectory, cond: PromptEmbeds, step: int) -> ProbeTerms:
        """The gradient probe's terms on the sub-batch ``traj`` at update ``step``."""
