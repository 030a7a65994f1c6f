"""The text conditioning a flow model is sampled and trained with: a container of tensors.

Its own module, below both the text-embedding cache (``models``) that produces it and the
rollout (``flow``) that consumes it, so neither imports the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t.to(device)``, except that a CPU -> CUDA copy does not stall the CPU: it is staged in
    pinned memory and queued asynchronously (torch's host allocator keeps the staging buffer
    until the copy has run). A plain copy from pageable memory waits for the GPU to drain."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass
class PromptEmbeds:
    """Text conditioning of SD3, one row per sample."""

    prompt_embeds: torch.Tensor
    """``[B, L, D]`` joint CLIP-L/CLIP-G/T5 token embeddings (``encoder_hidden_states``)."""
    pooled: torch.Tensor
    """``[B, P]`` pooled CLIP-L + CLIP-G embeddings (``pooled_projections``)."""

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> PromptEmbeds:
        if device is not None:
            return PromptEmbeds(to_device(self.prompt_embeds, device), to_device(self.pooled, device)).to(dtype=dtype)
        return PromptEmbeds(self.prompt_embeds.to(dtype=dtype), self.pooled.to(dtype=dtype))

    def index(self, idx: int | slice | torch.Tensor | Sequence[int]) -> PromptEmbeds:
        """Rows ``idx`` (an int keeps the batch dim)."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        elif not isinstance(idx, (slice, torch.Tensor)):
            idx = torch.as_tensor(list(idx), dtype=torch.long)
        if isinstance(idx, torch.Tensor):
            idx = idx.to(self.prompt_embeds.device)
        return PromptEmbeds(self.prompt_embeds[idx], self.pooled[idx])

    __getitem__ = index

    @staticmethod
    def cat(items: Sequence[PromptEmbeds]) -> PromptEmbeds:
        return PromptEmbeds(torch.cat([e.prompt_embeds for e in items]), torch.cat([e.pooled for e in items]))

    def repeat_interleave(self, n: int) -> PromptEmbeds:
        """Each row ``n`` times in a row: prompts -> groups of ``n`` samples."""
        return PromptEmbeds(self.prompt_embeds.repeat_interleave(n, dim=0), self.pooled.repeat_interleave(n, dim=0))

    def expand(self, n: int) -> PromptEmbeds:
        """A batch of ``n`` from a batch of 1 (a view, e.g. the empty-prompt embedding) or of ``n``."""
        if len(self) == n:
            return self
        if len(self) != 1:
            raise ValueError(f"cannot expand {len(self)} prompt embeddings to a batch of {n}")
        return PromptEmbeds(
            self.prompt_embeds.expand(n, *self.prompt_embeds.shape[1:]), self.pooled.expand(n, *self.pooled.shape[1:])
        )
