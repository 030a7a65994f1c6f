"""Device and dtype choice shared by `apex score` and `apex serve`."""

from __future__ import annotations

import torch

from apexcli.errors import ApexError
from apexcli.rewards.base import resolve_dtype
from apexcli.rewards.suite import SUITE_DTYPE


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """'auto' -> cuda when available else cpu; dtype 'auto' -> ``SUITE_DTYPE`` (float32) on every
    device, as training and evaluation score, so each objective gets the same dtype in every
    command (its own ``rewards.X.dtype`` still wins: deqa float16). An explicit dtype is for the
    rewards without their own; their scores then differ from training's."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ApexError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ApexError(f"--device {device}: no CUDA GPU is visible; use --device cpu")
    return dev, resolve_dtype("" if dtype == "auto" else dtype, SUITE_DTYPE)
