"""Reward names -> implementations. Model rewards are imported only when built."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from apexcli.errors import ApexError
from apexcli.rewards.base import Reward
from apexcli.rewards.config import RewardsConfig


@dataclass(frozen=True)
class RewardSpec:
    """Where a reward lives and what it needs."""

    module: str  # module under apexcli.rewards
    cls: str  # class name in that module
    section: str  # RewardsConfig field holding its options
    needs_prompt: bool  # reads the prompt
    summary: str  # one line for --help and errors


REGISTRY: dict[str, RewardSpec] = {
    "pick": RewardSpec("pick", "PickScore", "pick", True, "PickScore_v1: 100·cos(image, text), ≈ 21–24"),
    "aes": RewardSpec("aes", "Aesthetic", "aes", False, "LAION improved aesthetic MLP on CLIP ViT-L/14, ≈ 5–6.5"),
    "deqa": RewardSpec("deqa", "DeQAScore", "deqa", False, "DeQA-Score image quality, 1–5"),
    "ocr": RewardSpec("ocr", "OcrReward", "ocr", True, "1 − min(lev, len)/len vs the prompt's quoted text"),
    "brightness": RewardSpec("toy", "Brightness", "toy", False, "mean luma, 0–1"),
    "colorfulness": RewardSpec("toy", "Colorfulness", "toy", False, "Hasler–Süsstrunk, 0–255 scale"),
    "compressibility": RewardSpec("toy", "Compressibility", "toy", False, "−JPEG size in kB"),
    "contrast": RewardSpec("toy", "Contrast", "toy", False, "RMS contrast of luma, 0–0.5"),
    # the miniature world's stand-ins for pick, deqa and aes (weight-free; docs/method/mini-world.md)
    "adherence": RewardSpec("adherence", "Adherence", "toy", True, "world prompt adherence from pixels, 16–24 (pick's role)"),
    "quality": RewardSpec("quality", "Quality", "toy", False, "crisp edges + clean flat regions, 1–5 (deqa's role)"),
    "appeal": RewardSpec("appeal", "Appeal", "toy", False, "centring, coverage, harmony, contrast, 5–6.5 (aes's role)"),
}
ALIASES = {"pickscore": "pick", "aesthetic": "aes", "aesthetics": "aes"}
REWARD_NAMES: tuple[str, ...] = tuple(sorted(REGISTRY))


def split_remote(objective: str) -> tuple[str, str]:
    """'deqa@http://host:port' -> ('deqa', 'http://host:port'); 'pick' -> ('pick', '')."""
    name, sep, url = objective.strip().partition("@")
    return name.strip(), url.strip() if sep else ""


def canonical_name(name: str) -> str:
    """Resolve aliases (pickscore -> pick); unknown names raise ApexError listing the valid ones."""
    key = split_remote(name)[0].lower()
    key = ALIASES.get(key, key)
    if key not in REGISTRY:
        raise ApexError(f"unknown objective {name!r}; valid: {', '.join(REWARD_NAMES)}")
    return key


def resolve_objective(objective: str, config: RewardsConfig) -> tuple[str, str]:
    """'deqa@URL' -> ('deqa', URL); 'deqa' -> ('deqa', rewards.deqa.url): the reward and the server
    that scores it ('' = in process), decided once for the suite and the doctor checks alike."""
    name, url = split_remote(objective)
    key = canonical_name(name)
    return key, url or getattr(getattr(config, REGISTRY[key].section), "url", "")


def needs_prompt(name: str) -> bool:
    return REGISTRY[canonical_name(name)].needs_prompt


def build_reward(name: str, config: RewardsConfig, device: torch.device | str, dtype: torch.dtype) -> Reward:
    """Build the in-process reward `name` with its config section."""
    key = canonical_name(name)
    spec = REGISTRY[key]
    module = importlib.import_module(f"apexcli.rewards.{spec.module}")
    cls = getattr(module, spec.cls)
    return cls(getattr(config, spec.section), device=device, dtype=dtype)
