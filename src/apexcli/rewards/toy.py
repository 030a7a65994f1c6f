"""Weight-free metrics on images in [0,1]; pure functions first, reward wrappers after.

Scales (what each returns per image):
- brightness:      mean luma Y = 0.299 R + 0.587 G + 0.114 B, in [0, 1].
- contrast:        RMS contrast = standard deviation of Y over the pixels, in [0, 0.5].
- colorfulness:    Hasler & Süsstrunk (2003) on the 0–255 scale: with rg = R − G and
                   yb = (R + G)/2 − B,  M = sqrt(σ_rg² + σ_yb²) + 0.3 · sqrt(μ_rg² + μ_yb²).
                   0 for grey images; ≈ 33 "moderately", ≈ 59 "quite", ≥ 82 "highly" colourful.
- compressibility: −(size of the 8-bit image encoded as JPEG at a fixed quality) in kilobytes
                   (1 kB = 1000 bytes): higher = simpler image.
They conflict (bright vs colourful vs compressible), which makes them a fair CPU test bed.
"""

from __future__ import annotations

import io
from typing import Any

import torch
from PIL import Image

from apexcli.rewards.base import ImageBatch, Reward
from apexcli.rewards.config import ToyConfig

_LUMA = (0.299, 0.587, 0.114)


def luma(images: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] -> [B,H,W] Rec.601 luma."""
    w = images.new_tensor(_LUMA).view(1, 3, 1, 1)
    return (images * w).sum(dim=1)


def brightness(images: torch.Tensor) -> torch.Tensor:
    """Mean luma per image, [B] in [0, 1]."""
    return luma(images).flatten(1).mean(dim=1)


def contrast(images: torch.Tensor) -> torch.Tensor:
    """RMS contrast: population standard deviation of luma per image, [B] in [0, 0.5]."""
    return luma(images).flatten(1).std(dim=1, unbiased=False)


def colorfulness(images: torch.Tensor) -> torch.Tensor:
    """Hasler–Süsstrunk colourfulness on the 0–255 scale, [B]."""
    x = images * 255.0
    r, g, b = x[:, 0].flatten(1), x[:, 1].flatten(1), x[:, 2].flatten(1)
    rg = r - g
    yb = 0.5 * (r + g) - b
    std_root = torch.sqrt(rg.var(dim=1, unbiased=False) + yb.var(dim=1, unbiased=False))
    mean_root = torch.sqrt(rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2)
    return std_root + 0.3 * mean_root


def jpeg_kilobytes(image: Image.Image, quality: int) -> float:
    """Size of one 8-bit RGB image encoded as JPEG at `quality`, in kB (1000 bytes)."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.tell() / 1000.0


def _per_batch(fn, batch: ImageBatch) -> torch.Tensor:
    """Apply a [B,3,H,W] -> [B] metric on a stacked batch, or image by image for mixed sizes."""
    stacked = batch.stacked("cpu") if not batch.is_tensor else batch.stacked(batch._tensor.device)  # type: ignore[union-attr]
    if stacked is not None:
        return fn(stacked.float()).cpu()
    return torch.cat([fn(t.unsqueeze(0).float()) for t in batch.per_image()]).cpu()


class Brightness(Reward):
    name = "brightness"

    def __init__(self, *_, **__):
        self.batch_size = 256

    def score(self, batch: ImageBatch, prompts: list[str]) -> tuple[torch.Tensor, dict[str, Any]]:
        return _per_batch(brightness, batch), {}


class Contrast(Reward):
    name = "contrast"

    def __init__(self, *_, **__):
        self.batch_size = 256

    def score(self, batch: ImageBatch, prompts: list[str]) -> tuple[torch.Tensor, dict[str, Any]]:
        return _per_batch(contrast, batch), {}


class Colorfulness(Reward):
    name = "colorfulness"

    def __init__(self, *_, **__):
        self.batch_size = 256

    def score(self, batch: ImageBatch, prompts: list[str]) -> tuple[torch.Tensor, dict[str, Any]]:
        return _per_batch(colorfulness, batch), {}


class Compressibility(Reward):
    name = "compressibility"
    cpu_bound = True  # JPEG encoding runs on the CPU (PIL releases the GIL while encoding)
    uses_pil = True

    def __init__(self, config: ToyConfig | None = None, *_, **__):
        self.quality = (config or ToyConfig()).jpeg_quality
        self.batch_size = 256

    def score(self, batch: ImageBatch, prompts: list[str]) -> tuple[torch.Tensor, dict[str, Any]]:
        sizes = [jpeg_kilobytes(im, self.quality) for im in batch.pil()]
        return -torch.tensor(sizes, dtype=torch.float32), {}
