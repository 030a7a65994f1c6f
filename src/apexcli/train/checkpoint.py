"""Atomic, resumable checkpoints.

    checkpoints/step-000100/
        pytorch_lora_weights.safetensors    live LoRA, diffusers format (load_lora_weights reads it)
        ema/pytorch_lora_weights.safetensors  EMA LoRA when train.ema_decay > 0
        state/optimizer.pt  state/balancer.pt  state/trainer.pt   (torch.save; read back weights_only)
        config.yaml

The directory is written under a temporary name and renamed, so a crash never leaves a half
checkpoint under a final name; ``--resume auto`` takes the newest complete one.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

from apexcli.errors import ApexError
from apexcli.runs import CONFIG_FILE, LORA_FILE, RunDir, atomic_directory, parse_step_dirname


@dataclass
class TrainingState:
    step: int
    optimizer: dict
    lr_scheduler: dict
    balancer: dict
    ema: dict | None
    rng: dict


def save_checkpoint(
    run: RunDir, step: int, *, save_lora, save_ema_lora, state: TrainingState, config_yaml: str, keep: int
) -> Path:
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
        # the one just written always stays, whatever older or higher-numbered dirs are around
        for old in [s for s in run.checkpoint_steps() if s != step][: -(keep - 1) or None]:
            _delete(run.checkpoint_dir(old))
        # step folders without a LoRA file below the newest kept one: left by a delete that was
        # killed midway before deletes went through a rename; they are no checkpoint
        for old in _incomplete_steps(run, below=min(run.checkpoint_steps())):
            _delete(run.checkpoint_dir(old))
    return final


def _delete(folder: Path) -> None:
    """Rename first, then delete: a kill midway leaves ``.step-N.deleting``, which the next start
    removes, never a ``step-N`` folder that looks like a checkpoint but lost its files."""
    doomed = folder.with_name(f".{folder.name}.deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _incomplete_steps(run: RunDir, below: int) -> list[int]:
    steps = [parse_step_dirname(p.name) for p in run.checkpoints_dir.iterdir() if p.is_dir()]
    return [s for s in steps if s is not None and s < below and not (run.checkpoint_dir(s) / LORA_FILE).is_file()]


class CheckpointError(ApexError):
    """A checkpoint that cannot be read; ``file`` is the culprit."""

    def __init__(self, checkpoint: Path, file: str, reason: str):
        self.checkpoint, self.file, self.reason = Path(checkpoint), file, reason
        super().__init__(f"checkpoint '{checkpoint}' is unreadable: {file} {reason}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:120]}" if text else type(exc).__name__


def _torch_file(checkpoint: Path, name: str, map_location) -> dict:
    path = checkpoint / name
    if not path.is_file():
        raise CheckpointError(checkpoint, name, "is missing")
    try:
        # any failure here is the file's: garbage raises UnpicklingError, an empty file EOFError
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(checkpoint, name, f"is corrupt ({_first_line(exc)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(checkpoint, name, f"holds a {type(data).__name__}, not a state mapping")
    return data


def _check_lora_file(checkpoint: Path, name: str) -> None:
    """Read every tensor of a LoRA file: a truncated file fails here, not half-way through setup."""
    path = checkpoint / name
    if not path.is_file():
        raise CheckpointError(checkpoint, name, "is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            for key in keys:
                f.get_tensor(key)
    except Exception as exc:
        raise CheckpointError(checkpoint, name, f"is corrupt ({_first_line(exc)})") from None
    if not keys:
        raise CheckpointError(checkpoint, name, "holds no tensors")


def read_checkpoint_config(checkpoint: Path) -> dict:
    path = checkpoint / CONFIG_FILE
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(checkpoint, CONFIG_FILE, "is missing") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CheckpointError(checkpoint, CONFIG_FILE, f"is corrupt ({_first_line(exc)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(checkpoint, CONFIG_FILE, "is not a YAML mapping")
    return data


def load_training_state(checkpoint: Path, map_location: str | torch.device = "cpu") -> TrainingState:
    """Read and check every file of a checkpoint (LoRA, EMA LoRA, state, config); raises
    ``CheckpointError`` naming the first bad file."""
    checkpoint = Path(checkpoint)
    _check_lora_file(checkpoint, LORA_FILE)
    if (checkpoint / "ema").exists():
        _check_lora_file(checkpoint, f"ema/{LORA_FILE}")
    trainer = _torch_file(checkpoint, "state/trainer.pt", map_location)
    optimizer = _torch_file(checkpoint, "state/optimizer.pt", map_location)
    balancer = _torch_file(checkpoint, "state/balancer.pt", "cpu")
    missing = [k for k in ("step", "lr_scheduler", "ema", "rng") if k not in trainer]
    if missing or not isinstance(trainer["step"], int):
        raise CheckpointError(checkpoint, "state/trainer.pt", f"lacks {missing[0] if missing else 'an integer step'}")
    read_checkpoint_config(checkpoint)
    return TrainingState(
        step=int(trainer["step"]),
        optimizer=optimizer,
        lr_scheduler=trainer["lr_scheduler"],
        balancer=balancer,
        ema=trainer["ema"],
        rng=trainer["rng"],
    )
