"""Device and dtype choice shared by `apex score` and `apex serve`."""

from __future__ import annotations

import torch

from apexcli.errors import ApexError
from apexcli.rewards.base import resolve_dtype


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """'auto' -> cuda when available else cpu; dtype 'auto' -> bfloat16 on cuda, float32 on cpu."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ApexError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ApexError(f"--device {device}: no CUDA GPU is visible; use --device cpu")
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, resolve_dtype(dtype, torch.float32)
