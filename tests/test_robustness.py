"""What a failure must not do: a non-finite gradient never reaches the LoRA weights."""

from __future__ import annotations

import math

import torch

from apexcli.config import resolve_config
from apexcli.train.trainer import Trainer
from helpers import tiny_overrides


def test_a_non_finite_gradient_is_skipped_not_applied(tmp_path):
    cfg = resolve_config(preset="tiny", options={"out": str(tmp_path / "run")}, overrides=tiny_overrides())
    trainer = Trainer(cfg, argv=["test"])
    try:
        trainer.setup()
        before = [p.detach().clone() for p in trainer.lora_params]
        hooks = [p.register_hook(lambda g: g * math.inf) for p in trainer.lora_params]  # an overflow
        trainer.step = 1
        row = trainer.train_step()
        assert row["skipped_updates"] == 1
        assert not math.isfinite(row["grad_norm"])
        assert all(torch.equal(b, p) for b, p in zip(before, trainer.lora_params))
        for h in hooks:
            h.remove()
        trainer.step = 2
        row = trainer.train_step()
        assert row["skipped_updates"] == 0
        assert any(not torch.equal(b, p) for b, p in zip(before, trainer.lora_params))
    finally:
        trainer.close()
