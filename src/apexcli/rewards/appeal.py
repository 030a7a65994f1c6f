"""Aesthetic appeal in the miniature world (the LAION-aesthetic role): composition, colour
harmony and figure-ground contrast. Weight-free and prompt-free.

Named `appeal` because `aesthetic` already resolves to the LAION predictor (`aes`).

With I the image in [0,1] RGB, Y its luma, b the border's median colour (the background) and
F the figure = pixels farther than 0.25 from b in RGB, p = |F| / (H·W):

    centring  = 1 − min(1, |centroid(F) − image centre| / 0.5)   (fractions of the side)
    coverage  = exp(−ln²(p / 0.2) / (2 · 0.8²))                  the subject fills about a fifth
    harmony   = 1 − (Σ_F |c| − |Σ_F c|) / |F|                    c = (R − (G+B)/2, (√3/2)(G − B)),
                the chroma vector (hue angle, length ≈ chroma): 1 for one hue or none (greys),
                lower as the figure mixes clashing hues
    contrast  = min(1, |mean_F Y − Y(b)| / 0.4)                  the figure stands out in luma
    e         = (centring + coverage + harmony + contrast) / 4
    appeal    = 5 + 1.5 · e                                       (LAION aesthetic's ≈ 5–6.5 scale)

An image without a figure (p = 0) scores e = 0 on every term but harmony (1): 5.375.
The terms pull against prompt adherence on purpose, as taste and prompts do: an object asked
for "on the left" is off-centre, "yellow on white" has little contrast, three small objects
cover less than one big one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from apexcli.rewards.base import ImageBatch, Reward
from apexcli.rewards.pixels import batched, border_color, luma

FIGURE = 0.25
IDEAL_COVER = 0.2
COVER_SIGMA = 0.8
CONTRAST_FULL = 0.4


def appeal_parts(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four terms, each [B] in [0,1]."""
    b, _, h, w = images.shape
    bg = border_color(images)  # [B,3]
    fig = (images - bg.view(b, 3, 1, 1)).square().sum(dim=1).sqrt() > FIGURE  # [B,H,W]
    f = fig.float()
    n = f.flatten(1).sum(dim=1)
    has = n > 0
    n1 = n.clamp(min=1)
    ys = (torch.arange(h, dtype=images.dtype) + 0.5) / h
    xs = (torch.arange(w, dtype=images.dtype) + 0.5) / w
    cx = (f.sum(dim=1) * xs).sum(dim=1) / n1
    cy = (f.sum(dim=2) * ys).sum(dim=1) / n1
    off = torch.sqrt((cx - 0.5) ** 2 + (cy - 0.5) ** 2)
    centring = torch.where(has, 1 - (off / 0.5).clamp(max=1), torch.zeros_like(off))

    p = n / (h * w)
    coverage = torch.where(
        has, torch.exp(-(torch.log(p.clamp(min=1e-6) / IDEAL_COVER) ** 2) / (2 * COVER_SIGMA**2)), torch.zeros_like(p)
    )

    r, g, bl = images[:, 0], images[:, 1], images[:, 2]
    ca = (r - (g + bl) / 2) * f
    cb = (math.sqrt(3) / 2 * (g - bl)) * f
    total = torch.sqrt(ca**2 + cb**2).flatten(1).sum(dim=1)
    resultant = torch.sqrt(ca.flatten(1).sum(dim=1) ** 2 + cb.flatten(1).sum(dim=1) ** 2)
    harmony = 1 - (total - resultant) / n1

    y = luma(images)
    y_bg = luma(bg.view(b, 3, 1, 1)).view(b)
    y_fig = (y * f).flatten(1).sum(dim=1) / n1
    contrast = torch.where(has, ((y_fig - y_bg).abs() / CONTRAST_FULL).clamp(max=1), torch.zeros_like(y_fig))
    return {"centring": centring, "coverage": coverage, "harmony": harmony, "contrast": contrast}


def appeal(images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
    """5 + 1.5·e per image, [B] in [5, 6.5]."""
    parts = appeal_parts(images)
    e = sum(parts.values()) / len(parts)
    return 5 + 1.5 * e


class Appeal(Reward):
    name = "appeal"

    def __init__(self, *_: Any, **__: Any):
        self.batch_size = 256

    def score(self, batch: ImageBatch, prompts: list[str]) -> tuple[torch.Tensor, dict[str, Any]]:
        return batched(appeal, batch, prompts), {}
