"""CLIP image pre-processing as tensor ops on the device (no per-image processor call).

Mirrors `transformers.CLIPImageProcessor` (v4.57, the PIL one): resize so the shortest edge
is `size` (bicubic; the long edge is int(size · long / short)), center-crop to `crop_size`
(top = (H − h) // 2, left = (W − w) // 2), then (x − mean) / std per channel. The settings
are read from the processor's config, so a model with other sizes or statistics just works.

The resize is PIL's own arithmetic as matrix products: PIL resizes in two 1-D passes,
horizontal then vertical, each with bicubic (a = −0.5) coefficients quantised to 22-bit fixed
point, and stores uint8 after each pass. `pil_bicubic_matrix` builds those integer
coefficients and the passes run in float64 (exact for these integers), from the image rounded
to 8 bits as the reference converts it. Against the processor (`tests/test_rewards_clip.py`,
OpenAI-CLIP settings) the output is identical on 512², 1024², 512×768 and 64² → 224
upscaled images. One float resize without the intermediate rounding was off by up to 3.6
levels (512² noise), 6.9 (64² upscaled), mean 0.3; torch's antialiased bicubic with the
rounding between passes, by up to 2 levels (its float coefficients).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import CLIPImageProcessor

PRECISION_BITS = 22  # PIL's fixed point for 8-bit resampling: 32 - 8 - 2


def _bicubic(x: float, a: float = -0.5) -> float:
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


@functools.lru_cache(maxsize=32)
def _pil_bicubic_cpu(in_size: int, out_size: int) -> torch.Tensor:
    scale = in_size / out_size
    filterscale = max(scale, 1.0)  # downscaling widens the kernel (antialiasing)
    support = 2.0 * filterscale
    m = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        ks = [_bicubic((j - center + 0.5) / filterscale) for j in range(lo, hi)]
        total = sum(ks)
        for j, k in zip(range(lo, hi), ks):
            k = k / total if total != 0.0 else k
            # int() truncates toward zero, as the C cast does
            m[i, j] = int(k * (1 << PRECISION_BITS) + (0.5 if k >= 0 else -0.5))
    return m


def pil_bicubic_matrix(in_size: int, out_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[out, in] float64: PIL's integer bicubic coefficients for one axis (Resample.c)."""
    return _pil_bicubic_cpu(in_size, out_size).to(device)


def _store_uint8(acc: torch.Tensor) -> torch.Tensor:
    """PIL's clip8: add half, shift the fixed point away (floor), clip to 0-255."""
    return torch.floor((acc + (1 << (PRECISION_BITS - 1))) / (1 << PRECISION_BITS)).clamp_(0.0, 255.0)


@dataclass(frozen=True)
class ClipPreprocess:
    """Resize + crop + normalise settings of one CLIP image processor."""

    shortest_edge: int | None  # resize target of the short side (None: resize to (height, width))
    resize_hw: tuple[int, int] | None  # fixed resize target when the config gives height/width
    crop_hw: tuple[int, int] | None  # center crop (None: no crop)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_processor(cls, proc: CLIPImageProcessor) -> ClipPreprocess:
        size = proc.size if getattr(proc, "do_resize", True) else None
        shortest, resize_hw = None, None
        if isinstance(size, dict) and "shortest_edge" in size:
            shortest = int(size["shortest_edge"])
        elif isinstance(size, dict) and "height" in size:
            resize_hw = (int(size["height"]), int(size["width"]))
        elif isinstance(size, int):
            shortest = size
        crop = proc.crop_size if getattr(proc, "do_center_crop", True) else None
        crop_hw = None
        if isinstance(crop, dict):
            crop_hw = (int(crop["height"]), int(crop["width"]))
        elif isinstance(crop, int):
            crop_hw = (crop, crop)
        return cls(shortest, resize_hw, crop_hw, tuple(proc.image_mean), tuple(proc.image_std))

    def resize_target(self, h: int, w: int) -> tuple[int, int]:
        if self.resize_hw is not None:
            return self.resize_hw
        if self.shortest_edge is None:
            return h, w
        s = self.shortest_edge
        return (s, int(s * w / h)) if h <= w else (int(s * h / w), s)

    def _one_size(self, x: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [0,1] (all the same size) -> normalised [B,3,h,w]."""
        h, w = x.shape[-2:]
        th, tw = self.resize_target(h, w)
        # 8-bit levels, as the reference hands the processor uint8 images
        x = torch.floor(x.double() * 255.0 + 0.5).clamp_(0.0, 255.0)
        # PIL: the horizontal pass, stored as uint8, then the vertical pass, stored again
        if tw != w:
            x = _store_uint8(x @ pil_bicubic_matrix(w, tw, x.device).T)
        if th != h:
            x = _store_uint8(pil_bicubic_matrix(h, th, x.device) @ x)
        x = (x / 255.0).float()
        if self.crop_hw is not None:
            ch, cw = self.crop_hw
            if th < ch or tw < cw:  # pad like the processor does for too-small images
                ph, pw = max(0, ch - th), max(0, cw - tw)
                x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
                th, tw = x.shape[-2:]
            top, left = (th - ch) // 2, (tw - cw) // 2
            x = x[..., top : top + ch, left : left + cw]
        mean = x.new_tensor(self.mean).view(1, 3, 1, 1)
        std = x.new_tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    def __call__(
        self, images: torch.Tensor | list[torch.Tensor], device: torch.device | str, dtype: torch.dtype
    ) -> torch.Tensor:
        """A [B,3,H,W] batch or a list of [3,H,W] images in [0,1] -> pixel_values [B,3,h,w]."""
        if isinstance(images, torch.Tensor):
            out = self._one_size(images.to(device=device, dtype=torch.float32))
        else:
            out = torch.cat([self._one_size(t.to(device=device, dtype=torch.float32).unsqueeze(0)) for t in images])
        return out.to(dtype)


def batch_pixels(pre: ClipPreprocess, batch, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """Pixel values for an ImageBatch: one tensor op when the images share a size."""
    stacked = batch.stacked(device)
    return pre(stacked if stacked is not None else batch.per_image(), device, dtype)
