"""What every reward shares: the image batch it receives and the interface it implements.

A reward is built once (device, dtype, its config section) and called on a batch:

    scores, info = reward(batch, prompts)     # scores: float32 [B] on CPU, NaN = does not apply

`ImageBatch` holds the images in whichever form they came (a float tensor [B,3,H,W] in [0,1],
e.g. what the VAE decodes, or PIL images of any size) and converts lazily and at most once:
GPU rewards read tensors, OCR reads PIL RGB images.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from apexcli.errors import ApexError

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(name: str, default: torch.dtype) -> torch.dtype:
    """Per-reward dtype override: '' keeps the suite's dtype."""
    if not name:
        return default
    if name not in _DTYPES:
        raise ApexError(f"unknown dtype {name!r}; valid: {', '.join(sorted(_DTYPES))}")
    return _DTYPES[name]


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image -> float32 [3,H,W] in [0,1] (converted to RGB first)."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def tensor_to_pil(t: torch.Tensor) -> Image.Image:
    """float [3,H,W] in [0,1] -> PIL RGB, rounding to the nearest 8-bit level."""
    arr = t.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, mode="RGB")


class ImageBatch:
    """A batch of images as a stacked tensor or a list of PIL images; conversions are cached."""

    def __init__(self, images: torch.Tensor | Sequence[Image.Image]):
        if isinstance(images, ImageBatch):
            images = images._tensor if images._tensor is not None else images._pil
        self._tensor: torch.Tensor | None = None
        self._pil: list[Image.Image] | None = None
        self._per_image: list[torch.Tensor] | None = None
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] != 3:
                raise ApexError(f"images must be a float tensor [N,3,H,W] in [0,1]; got shape {tuple(images.shape)}")
            self._tensor = images.detach().clamp(0.0, 1.0)  # decoders overshoot [0,1] slightly
        else:
            pil = list(images)
            for im in pil:
                if not isinstance(im, Image.Image):
                    raise ApexError(f"images must be a tensor or PIL images; got {type(im).__name__}")
            self._pil = [im if im.mode == "RGB" else im.convert("RGB") for im in pil]

    def __len__(self) -> int:
        return self._tensor.shape[0] if self._tensor is not None else len(self._pil)  # type: ignore[arg-type]

    def slice(self, start: int, stop: int) -> ImageBatch:
        """Images start..stop-1 as a new batch (shares storage)."""
        if self._tensor is not None:
            part = ImageBatch(self._tensor[start:stop])
            if self._pil is not None:  # keep conversions already paid for
                part._pil = self._pil[start:stop]
        else:
            part = ImageBatch(self._pil[start:stop])  # type: ignore[index]
        if self._per_image is not None:
            part._per_image = self._per_image[start:stop]
        return part

    @property
    def is_tensor(self) -> bool:
        return self._tensor is not None

    def stacked(self, device: torch.device | str) -> torch.Tensor | None:
        """[B,3,H,W] float32 on `device` when the batch is one tensor or same-size images, else None."""
        if self._tensor is not None:
            return self._tensor.to(device=device, dtype=torch.float32)
        sizes = {im.size for im in self._pil}  # type: ignore[union-attr]
        if len(sizes) == 1:
            return torch.stack(self.per_image()).to(device)
        return None

    def per_image(self) -> list[torch.Tensor]:
        """Each image as float32 [3,H,W] in [0,1] (CPU for PIL input, the tensor's device otherwise)."""
        if self._per_image is None:
            if self._tensor is not None:
                self._per_image = list(self._tensor.float().unbind(0))
            else:
                self._per_image = [pil_to_tensor(im) for im in self._pil]  # type: ignore[union-attr]
        return self._per_image

    def pil(self) -> list[Image.Image]:
        """Each image as PIL RGB (8-bit; tensors are rounded to the nearest level)."""
        if self._pil is None:
            cpu = self._tensor.detach().float().cpu()  # type: ignore[union-attr]
            self._pil = [tensor_to_pil(t) for t in cpu]
        return self._pil


class Reward(ABC):
    """Base class of a reward. Subclasses set the class attributes and implement `score`.

    Built as ``cls(options, device=device, dtype=dtype)``: ``options`` is the reward's config
    section (``rewards.pick`` ...) for a built-in reward, an instance of its ``Options`` dataclass
    (from ``rewards.extra.<name>``) for a reward from outside apex, or None when it declares none.

    `score(batch, prompts)` receives at most `batch_size` images and returns (scores [B] float32
    CPU tensor, info dict of per-image lists). It must never silently return zeros: NaN marks
    "does not apply", errors raise.
    """

    name: ClassVar[str] = ""
    needs_prompt: ClassVar[bool] = False  # prompts are read by this reward
    cpu_bound: ClassVar[bool] = False  # True: run in the suite's worker pool beside device rewards
    uses_pil: ClassVar[bool] = False  # reads batch.pil(): the suite converts once for all such rewards
    batch_size: int = 64
    Options: ClassVar[type | None] = None
    """A dataclass of the options a reward from outside apex takes (``rewards.extra.<name>.<field>``)."""
    prompt_requirement: ClassVar[str] = "prompts it applies to"
    """What a prompt set needs for this reward to score anything (the start-up error says it)."""
    prompt_fix: ClassVar[str] = "a prompts.train with such prompts"

    @classmethod
    def applies_to(cls, prompt: str) -> bool:
        """Whether this reward scores images of ``prompt``; elsewhere it returns NaN by design.
        Training refuses an objective that applies to none of its prompts: it would never train."""
        return True

    @abstractmethod
    def score(self, batch: ImageBatch, prompts: list[str]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Score one chunk of at most `batch_size` images."""

    def __call__(
        self, images: torch.Tensor | Sequence[Image.Image] | ImageBatch, prompts: Sequence[str] | None = None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Score any number of images, in chunks of `batch_size`; returns ([N] float32 CPU, info)."""
        batch = images if isinstance(images, ImageBatch) else ImageBatch(images)
        n = len(batch)
        prompts = list(prompts) if prompts is not None else [""] * n
        if len(prompts) != n:
            raise ApexError(f"{self.name}: got {n} images but {len(prompts)} prompts")
        parts: list[torch.Tensor] = []
        info: dict[str, list] = {}
        for start in range(0, n, max(1, self.batch_size)):
            stop = min(n, start + max(1, self.batch_size))
            scores, part_info = self.score(batch.slice(start, stop), prompts[start:stop])
            parts.append(scores.detach().float().cpu().reshape(-1))
            for key, values in part_info.items():
                info.setdefault(key, []).extend(values)
        out = torch.cat(parts) if parts else torch.zeros(0)
        return out, info

    def close(self) -> None:  # noqa: B027  (a hook: most rewards hold nothing to release)
        """Release resources (worker threads, ONNX Runtime InferenceSessions). Models are freed with the object."""
