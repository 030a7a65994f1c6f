"""CLIP image pre-processing as tensor ops on the device (no per-image processor call).

Mirrors `transformers.CLIPImageProcessor` (v4.57): resize so the shortest edge is `size`
(bicubic; the long edge is int(size · long / short)), center-crop to `crop_size`
(top = (H − h) // 2, left = (W − w) // 2), then (x − mean) / std per channel. The settings
are read from the processor's config, so a model with other sizes or statistics just works.
Differences from the processor are below one 8-bit level (the processor rounds to uint8
after resizing; this keeps floats).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import CLIPImageProcessor


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
        if (th, tw) != (h, w):
            x = F.interpolate(x, size=(th, tw), mode="bicubic", antialias=True, align_corners=False)
            x = x.clamp(0.0, 1.0)  # the processor clips when it goes back to 8 bits
        if self.crop_hw is not None:
            ch, cw = self.crop_hw
            if th < ch or tw < cw:  # pad like the processor does for too-small images
                ph, pw = max(0, ch - th), max(0, cw - tw)
                x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
                th, tw = x.shape[-2:]
            top, left = (th - ch) // 2, (tw - cw) // 2
            x = x[..., top:top + ch, left:left + cw]
        mean = x.new_tensor(self.mean).view(1, 3, 1, 1)
        std = x.new_tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    def __call__(self, images: torch.Tensor | list[torch.Tensor], device: torch.device | str,
                 dtype: torch.dtype) -> torch.Tensor:
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
