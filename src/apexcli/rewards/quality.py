"""Image quality in the miniature world (the DeQA role): crisp edges and clean flat regions.

Weight-free and prompt-free. With I the image in [0,1] RGB and Y its luma:

    D        = |I(x+1,y) − I(x,y)|₂ and |I(x,y+1) − I(x,y)|₂   (every horizontal and vertical step)
    crisp    = Σ D·[D > 0.2] / (Σ D + 1)
               the share of all colour change that happens in jumps of at least 0.2 within one
               pixel: a sharp edge puts its whole change there, a blurred one spreads it over
               small steps, noise adds small steps everywhere (the +1 keeps a blank image at 0)
    σ_noise  = median |Y ∗ L| / (6 · 0.6745),   L = [[1,−2,1],[−2,4,−2],[1,−2,1]]
               Immerkær's noise estimate with a median instead of a mean (robust to the edges,
               which cover far less than half of the pixels); L cancels flat regions and ramps,
               so it measures noise, dither and checkerboard artefacts
    clean    = exp(−σ_noise / 0.01)        (1 = flat regions exactly flat; 0.37 at σ = 2.5/255)
    q        = (crisp + clean) / 2
    quality  = 1 + 4 · q                   (DeQA-Score's 1–5 scale)

The world's ground-truth renders (anti-aliased over one pixel) score ≈ 5; a Gaussian blur or
added noise lowers both terms.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from apexcli.rewards.base import ImageBatch, Reward
from apexcli.rewards.pixels import batched, luma

JUMP = 0.2
NOISE_SCALE = 0.01
_LAPLACE = torch.tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]]).view(1, 1, 3, 3)


def crispness(images: torch.Tensor) -> torch.Tensor:
    """[B] share of the total colour variation carried by one-pixel jumps above JUMP."""
    dx = (images[:, :, :, 1:] - images[:, :, :, :-1]).square().sum(dim=1).sqrt().flatten(1)
    dy = (images[:, :, 1:, :] - images[:, :, :-1, :]).square().sum(dim=1).sqrt().flatten(1)
    d = torch.cat([dx, dy], dim=1)
    return (d * (d > JUMP)).sum(dim=1) / (d.sum(dim=1) + 1.0)


def noise_sigma(images: torch.Tensor) -> torch.Tensor:
    """[B] robust estimate of the luma noise standard deviation (0–1 scale)."""
    response = F.conv2d(luma(images).unsqueeze(1), _LAPLACE.to(images.dtype)).flatten(1).abs()
    return response.median(dim=1).values / (6 * 0.6745)


def quality_parts(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(crisp [B], clean [B]), both in [0,1]."""
    return crispness(images), torch.exp(-noise_sigma(images) / NOISE_SCALE)


def quality(images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
    """1 + 4·(crisp + clean)/2 per image, [B] in [1, 5]."""
    crisp, clean = quality_parts(images)
    return 1 + 4 * (crisp + clean) / 2


class Quality(Reward):
    name = "quality"

    def __init__(self, *_: Any, **__: Any):
        self.batch_size = 256

    def score(self, batch: ImageBatch, prompts: list[str]) -> tuple[torch.Tensor, dict[str, Any]]:
        return batched(quality, batch, prompts), {}
