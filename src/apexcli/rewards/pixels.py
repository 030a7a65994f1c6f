"""Batched pixel analysis shared by the miniature world's rewards (adherence, quality, appeal).

Everything takes a float batch ``[B, 3, H, W]`` in [0, 1] and works on the whole batch at once
(no per-image Python loop): border-median background colours, nearest-palette labels,
8-connected components by label propagation, and per-component area, bounding box and centroid.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from apexcli.rewards.base import ImageBatch

_LUMA = (0.299, 0.587, 0.114)


def luma(images: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] -> [B,H,W] Rec.601 luma."""
    return (images * images.new_tensor(_LUMA).view(1, 3, 1, 1)).sum(dim=1)


def border_color(images: torch.Tensor, width: int = 2) -> torch.Tensor:
    """[B,3] per-channel median of the pixels within ``width`` of the image border: the
    background colour when the subject does not fill the frame."""
    b, c, h, w = images.shape
    mask = torch.ones(h, w, dtype=torch.bool, device=images.device)
    mask[width : h - width, width : w - width] = False
    return images[:, :, mask].median(dim=2).values


def nearest_palette(images: torch.Tensor, palette: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pixel's nearest palette colour: (index [B,H,W] long, RGB distance [B,H,W]).
    ``palette`` is [P,3] or per image [B,P,3], in [0,1]."""
    pal = palette if palette.ndim == 3 else palette.unsqueeze(0).expand(images.shape[0], -1, -1)
    # |x - p|² = |x|² - 2 x·p + |p|², as one batched matmul instead of a [B,P,3,H,W] difference
    x = images.flatten(2)  # [B,3,HW]
    d = x.square().sum(dim=1, keepdim=True) - 2 * pal @ x + pal.square().sum(dim=2, keepdim=True)
    dist, index = d.min(dim=1)
    b, _, h, w = images.shape
    return index.view(b, h, w), dist.clamp(min=0).sqrt().view(b, h, w)


def connected_components(mask: torch.Tensor) -> torch.Tensor:
    """8-connected component labels of a boolean batch ``[B,H,W]``: every pixel of a component
    holds the largest flat index (1-based) among its pixels; 0 outside the mask.

    Labels spread by 3x3 max-pooling restricted to the mask until nothing changes. Compact blobs
    settle in about their diameter; the rounds are capped at 2·(H+W), so a long winding component
    (never a shape of this world) may come out split in two."""
    b, h, w = mask.shape
    m = mask.unsqueeze(1).float()
    index = torch.arange(1, h * w + 1, device=mask.device, dtype=torch.float32).view(1, 1, h, w)
    labels = index * m
    for _ in range((2 * (h + w)) // 5 + 1):
        for _ in range(4):  # check for convergence every few rounds: fewer host syncs
            labels = F.max_pool2d(labels, 3, 1, 1) * m
        settled = F.max_pool2d(labels, 3, 1, 1) * m
        if torch.equal(settled, labels):
            break
        labels = settled
    return labels.squeeze(1).long()


@dataclass
class Components:
    """Per-image component statistics, padded to the largest component count ``C``."""

    area: torch.Tensor  # [B,C] pixels (0 = padding)
    cx: torch.Tensor  # [B,C] centroid x in [0,1] (pixel centres)
    cy: torch.Tensor  # [B,C] centroid y in [0,1]
    width: torch.Tensor  # [B,C] bounding-box width in pixels
    height: torch.Tensor  # [B,C] bounding-box height in pixels

    @property
    def fill(self) -> torch.Tensor:
        """[B,C] area / bounding-box area (circle π/4, square 1, upright triangle ≈ 1/2)."""
        return self.area / (self.width * self.height).clamp(min=1)


def component_stats(labels: torch.Tensor) -> Components:
    """Statistics of every component of ``connected_components`` output, largest first."""
    b, h, w = labels.shape
    n_slots = h * w + 1
    flat = (labels + torch.arange(b, device=labels.device).view(b, 1, 1) * n_slots).flatten()
    ys, xs = torch.meshgrid(torch.arange(h, device=labels.device), torch.arange(w, device=labels.device), indexing="ij")
    xs = xs.expand(b, h, w).flatten().float()
    ys = ys.expand(b, h, w).flatten().float()
    total = b * n_slots
    area = torch.bincount(flat, minlength=total).float()
    sx = torch.bincount(flat, weights=xs, minlength=total)
    sy = torch.bincount(flat, weights=ys, minlength=total)
    big = float(max(h, w) + 1)
    x0 = torch.full((total,), big).scatter_reduce(0, flat, xs, "amin")
    x1 = torch.full((total,), -1.0).scatter_reduce(0, flat, xs, "amax")
    y0 = torch.full((total,), big).scatter_reduce(0, flat, ys, "amin")
    y1 = torch.full((total,), -1.0).scatter_reduce(0, flat, ys, "amax")
    area = area.view(b, n_slots)
    area[:, 0] = 0  # label 0 is "outside the mask"
    n_max = max(1, int((area > 0).sum(dim=1).max()))
    top_area, slot = area.topk(n_max, dim=1)
    pick = lambda t: t.view(b, n_slots).gather(1, slot)
    safe = top_area.clamp(min=1)
    present = top_area > 0
    return Components(
        area=top_area,
        cx=torch.where(present, (pick(sx) / safe + 0.5) / w, torch.zeros_like(safe)),
        cy=torch.where(present, (pick(sy) / safe + 0.5) / h, torch.zeros_like(safe)),
        width=torch.where(present, pick(x1) - pick(x0) + 1, torch.zeros_like(safe)),
        height=torch.where(present, pick(y1) - pick(y0) + 1, torch.zeros_like(safe)),
    )


def batched(
    fn: Callable[[torch.Tensor, Sequence[str]], torch.Tensor], batch: ImageBatch, prompts: Sequence[str]
) -> torch.Tensor:
    """Apply ``fn(images [B,3,H,W], prompts) -> [B]`` to a stacked batch on the CPU, or image by
    image when the images differ in size (e.g. a folder scored by ``apex score``)."""
    stacked = batch.stacked("cpu")
    if stacked is not None:
        return fn(stacked.float().cpu(), list(prompts)).float()
    return torch.cat([fn(t.unsqueeze(0).float().cpu(), [p]) for t, p in zip(batch.per_image(), prompts)]).float()
