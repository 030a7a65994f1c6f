"""GRPO training of LoRA on SD3 flow models with multi-objective balancing."""

from __future__ import annotations

import sys
from pathlib import Path


def run_training(
    *,
    preset: str | None = None,
    config_file: str | Path | None = None,
    options: dict | None = None,
    overrides: list[str] | None = None,
    resume: str | None = None,
    argv: list[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Resolve the config from its layers and train; returns the run directory."""
    # imported here: the libraries' verbosity is set (quiet_libraries) before the trainer loads them
    from apexcli.config import resolve_config
    from apexcli.quiet import quiet_libraries
    from apexcli.train.trainer import train

    quiet_libraries()
    cfg = resolve_config(preset=preset, config_file=config_file, options=options, overrides=overrides)
    return train(cfg, resume=resume, argv=argv or sys.argv, overwrite=overwrite)
