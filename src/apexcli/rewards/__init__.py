"""Rewards: a registry of scorers (pick, aes, deqa, ocr, toy metrics) and the fused RewardSuite."""

from apexcli.rewards.base import ImageBatch, Reward
from apexcli.rewards.config import (
    AesConfig,
    DeqaConfig,
    OcrConfig,
    PickConfig,
    RemoteConfig,
    RewardsConfig,
    ToyConfig,
    apply_overrides,
)
from apexcli.rewards.registry import REGISTRY, REWARD_NAMES, build_reward, canonical_name, needs_prompt
from apexcli.rewards.suite import RewardSuite

__all__ = [
    "AesConfig", "DeqaConfig", "ImageBatch", "OcrConfig", "PickConfig", "REGISTRY", "REWARD_NAMES",
    "RemoteConfig", "Reward", "RewardSuite", "RewardsConfig", "ToyConfig", "apply_overrides",
    "build_reward", "canonical_name", "needs_prompt",
]
