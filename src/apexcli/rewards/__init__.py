"""Rewards: a registry of scorers (pick, aes, deqa, ocr, toy metrics, the mini world's adherence,
quality and appeal, and rewards added from outside apex) and the fused RewardSuite.

Names resolve lazily so that reading the reward options (``apexcli.rewards.config``, used by
the CLI's option parsing) does not import torch and the model code.
"""

from importlib import import_module

_WHERE = {
    "ImageBatch": "base",
    "Reward": "base",
    "AesConfig": "config",
    "DeqaConfig": "config",
    "OcrConfig": "config",
    "PickConfig": "config",
    "RemoteConfig": "config",
    "RewardsConfig": "config",
    "ToyConfig": "config",
    "apply_overrides": "config",
    "REGISTRY": "registry",
    "REWARD_NAMES": "registry",
    "build_reward": "registry",
    "canonical_name": "registry",
    "needs_prompt": "registry",
    "reward_class": "registry",
    "reward_spec": "registry",
    "RewardSuite": "suite",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'apexcli.rewards' has no attribute {name!r}")
    return getattr(import_module(f"apexcli.rewards.{_WHERE[name]}"), name)
