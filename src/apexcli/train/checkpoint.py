"""Atomic, resumable checkpoints (DESIGN.md §7).

    checkpoints/step-000100/
        pytorch_lora_weights.safetensors    live LoRA, diffusers format (load_lora_weights reads it)
        ema/pytorch_lora_weights.safetensors  EMA LoRA when train.ema_decay > 0
        state/optimizer.pt  state/balancer.pt  state/trainer.pt   (torch.save; read back weights_only)
        config.yaml

The directory is written under a temporary name and renamed, so a crash never leaves a half
checkpoint under a final name; ``--resume auto`` takes the newest complete one.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from apexcli.errors import ApexError
from apexcli.runs import CONFIG_FILE, LORA_FILE, RunDir, atomic_directory


@dataclass
class TrainingState:
    step: int
    optimizer: dict
    lr_scheduler: dict
    balancer: dict
    ema: dict | None
    rng: dict


def save_checkpoint(run: RunDir, step: int, *, save_lora, save_ema_lora, state: TrainingState, config_yaml: str, keep: int) -> Path:
    """``save_lora(dir)`` / ``save_ema_lora(dir)`` write diffusers-format LoRA files into ``dir``."""
    final = run.checkpoint_dir(step)
    with atomic_directory(final) as tmp:
        save_lora(tmp)
        if save_ema_lora is not None:
            (tmp / "ema").mkdir()
            save_ema_lora(tmp / "ema")
        (tmp / "state").mkdir()
        torch.save(state.optimizer, tmp / "state" / "optimizer.pt")
        torch.save(state.balancer, tmp / "state" / "balancer.pt")
        torch.save(
            {"step": state.step, "lr_scheduler": state.lr_scheduler, "ema": state.ema, "rng": state.rng},
            tmp / "state" / "trainer.pt",
        )
        (tmp / CONFIG_FILE).write_text(config_yaml, encoding="utf-8")
    if keep > 0:
        for old in run.checkpoint_steps()[:-keep]:
            shutil.rmtree(run.checkpoint_dir(old), ignore_errors=True)
    return final


def find_resume_checkpoint(run: RunDir, resume: str | None) -> Path | None:
    """``None``: fresh start; ``auto``: newest complete checkpoint of the run (or fresh);
    a path: that checkpoint dir (or that run's newest)."""
    if not resume:
        return None
    if resume == "auto":
        return run.latest_checkpoint()
    path = Path(resume)
    if (path / LORA_FILE).is_file() and (path / "state" / "trainer.pt").is_file():
        return path
    latest = RunDir(path).latest_checkpoint() if path.is_dir() else None
    if latest is None:
        raise ApexError(f"--resume '{resume}' is not a checkpoint (no {LORA_FILE} + state/) nor a run with checkpoints")
    return latest


def load_training_state(checkpoint: Path, map_location: str | torch.device = "cpu") -> TrainingState:
    state_dir = checkpoint / "state"
    try:
        trainer = torch.load(state_dir / "trainer.pt", map_location=map_location, weights_only=True)
        optimizer = torch.load(state_dir / "optimizer.pt", map_location=map_location, weights_only=True)
        balancer = torch.load(state_dir / "balancer.pt", map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as exc:
        raise ApexError(f"checkpoint '{checkpoint}' is unreadable ({str(exc).splitlines()[0][:120]}); resume from an older one") from None
    return TrainingState(
        step=int(trainer["step"]),
        optimizer=optimizer,
        lr_scheduler=trainer["lr_scheduler"],
        balancer=balancer,
        ema=trainer["ema"],
        rng=trainer["rng"],
    )
