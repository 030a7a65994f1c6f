"""A reward from outside apex: how red an image is. Weight-free, so it runs anywhere.

PYTHONPATH=examples/custom_reward apex train --preset tiny --objectives brightness,my_rewards:Redness
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from apexcli.rewards.base import ImageBatch, Reward
from apexcli.schema import setting


@dataclass
class RednessOptions:
    margin: float = setting(0.0, ge=0, le=1)
    """How far red must exceed green and blue before a pixel counts (rewards.extra.redness.margin)."""


class Redness(Reward):
    """Mean redness: how far each pixel's red exceeds its green and blue, 0-1."""

    name = "redness"  # its columns: reward/redness/mean ...; its options: rewards.extra.redness.*
    Options = RednessOptions

    def __init__(self, options: RednessOptions, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.margin = options.margin

    def score(self, batch: ImageBatch, prompts: list[str]) -> tuple[torch.Tensor, dict[str, Any]]:
        scores = [self._redness(image) for image in batch.per_image()]  # [3, H, W] in [0, 1] each
        return torch.stack(scores).float().cpu(), {}

    def _redness(self, image: torch.Tensor) -> torch.Tensor:
        r, g, b = image[0], image[1], image[2]
        return (r - torch.maximum(g, b) - self.margin).clamp(min=0).mean()
