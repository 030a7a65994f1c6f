"""DeQA-Score (You et al. 2025): image quality from a VLM (mPLUG-Owl2), 1–5.

The model's `score(images)` returns the expectation of the quality level over the
"excellent/good/fair/poor/bad" token probabilities. Its code ships with the weights
(`zhiyuanyou/DeQA-Score-Mix3`, remote code), so it runs only when the user allows it
explicitly (`rewards.deqa.trust_remote_code=true` / `--trust-remote-code`). That code needs
transformers 4.36.1 and casts to float16 inside `score()` (so it loads in float16 by default):
run it in its own environment with `make deqa-server` and
`.venv-deqa/bin/python -m apexcli.rewards.deqa_server --trust-remote-code` (see
`apexcli.rewards.deqa_server`), and score with `deqa@http://127.0.0.1:18086`.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM

from apexcli.errors import ApexError
from apexcli.rewards.base import ImageBatch, Reward, resolve_dtype
from apexcli.rewards.config import DeqaConfig
from apexcli.rewards.hub import dtype_kwargs, load_pretrained


class DeQAScore(Reward):
    name = "deqa"
    uses_pil = True

    def __init__(self, config: DeqaConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if not config.trust_remote_code:
            raise ApexError(
                f"deqa runs Python code shipped with {config.source}; allow it with --trust-remote-code "
                "(rewards.deqa.trust_remote_code=true), or serve it from its own environment (`make deqa-server`, "
                "then `.venv-deqa/bin/python -m apexcli.rewards.deqa_server --trust-remote-code`) and use "
                "deqa@http://127.0.0.1:18086"
            )
        self.device = torch.device(device)
        self.dtype = resolve_dtype(config.dtype, dtype)
        self.batch_size = config.batch_size
        kwargs: dict[str, Any] = {"trust_remote_code": True, **dtype_kwargs(self.dtype)}
        if config.attn_implementation:
            kwargs["attn_implementation"] = config.attn_implementation
        self.model = load_pretrained(
            AutoModelForCausalLM.from_pretrained,
            config.source,
            what="DeQA-Score model",
            option="rewards.deqa.source",
            **kwargs,
        )
        self.model.to(self.device).eval().requires_grad_(False)
        if not callable(getattr(self.model, "score", None)):
            raise ApexError(
                f"{config.source} has no score(images) method; point rewards.deqa.source at DeQA-Score weights"
            )

    @torch.inference_mode()
    def score(self, batch: ImageBatch, prompts: list[str]) -> tuple[torch.Tensor, dict[str, Any]]:
        out = torch.as_tensor(self.model.score(batch.pil())).detach().float().cpu().reshape(-1)
        if out.numel() != len(batch):
            raise ApexError(f"deqa score() returned {out.numel()} values for {len(batch)} images")
        return out, {}
