"""Exponential moving average of the LoRA weights (evaluated and saved beside the live ones)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from apexcli.sharding import full_tensor, shard_like


class LoraEMA:
    """ema <- d_n * ema + (1 - d_n) * param after optimizer step n (1, 2, ...) when n % every == 0.

    ``d_n = decay``, or with ``warmup`` ``d_n = min(decay, (1 + n) / (10 + n))`` (Flow-GRPO's
    schedule, which it applies every 8 optimizer steps with decay 0.9): early averages then
    follow the policy instead of staying near the initial adapter.
    """

    def __init__(self, params: list[torch.nn.Parameter], decay: float, *, every: int = 1, warmup: bool = False):
        self.params = params
        self.decay = decay
        self.every = max(int(every), 1)
        self.warmup = warmup
        self.steps = 0  # optimizer steps seen
        self.shadow = [p.detach().clone() for p in params]

    def current_decay(self) -> float:
        """The decay the update at optimizer step ``self.steps`` uses."""
        n = self.steps
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self) -> None:
        """Call after every optimizer step; averages on every ``every``-th."""
        self.steps += 1
        if self.steps % self.every:
            return
        weight = 1.0 - self.current_decay()
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), weight)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Temporarily load the EMA weights into the model (for evaluation or saving)."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)

    def state_dict(self) -> dict:
        """Whole tensors on CPU (a collective under FSDP2, where the shadows are shards)."""
        return {
            "decay": self.decay,
            "steps": self.steps,
            "shadow": [full_tensor(s).to("cpu", copy=True) for s in self.shadow],
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.steps = int(state.get("steps", 0))  # checkpoints before the schedule had no count
        for s, saved in zip(self.shadow, state["shadow"]):
            s.copy_(shard_like(saved, s))
