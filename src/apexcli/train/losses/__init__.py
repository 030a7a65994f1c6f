"""The policy losses of ``train.loss``, each one class behind ``PolicyLoss``."""

from __future__ import annotations

from apexcli.config import Config
from apexcli.train.losses.base import MicroBatch, PolicyLoss, PolicyModels, ProbeTerms, UpdateBatch
from apexcli.train.losses.grpo import GrpoLoss
from apexcli.train.losses.nft import NftLoss

POLICY_LOSSES: dict[str, type[PolicyLoss]] = {"grpo": GrpoLoss, "nft": NftLoss}


def build_policy_loss(cfg: Config, models: PolicyModels, steps_trained: list[int]) -> PolicyLoss:
    return POLICY_LOSSES[cfg.train.loss](cfg, models, steps_trained)


__all__ = [
    "POLICY_LOSSES",
    "GrpoLoss",
    "MicroBatch",
    "NftLoss",
    "PolicyLoss",
    "PolicyModels",
    "ProbeTerms",
    "UpdateBatch",
    "build_policy_loss",
]
