"""Exponential moving average of the LoRA weights (evaluated and saved beside the live ones)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from apexcli.sharding import full_tensor, shard_like


class LoraEMA:
    """ema <- decay * ema + (1 - decay) * param, after every optimizer step."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params = params
        self.decay = decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1.0 - self.decay)

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
        return {"decay": self.decay, "shadow": [full_tensor(s).to("cpu", copy=True) for s in self.shadow]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        for s, saved in zip(self.shadow, state["shadow"]):
            s.copy_(shard_like(saved, s))
