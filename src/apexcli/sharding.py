"""Whole tensors out of FSDP2 shards and back, so checkpoints never depend on the layout.

Under FSDP2 (``fully_shard``, what ``accelerate launch`` with ``fsdp_version: 2`` applies) every
parameter, gradient and optimizer state is a ``DTensor`` of which each rank holds a slice. The
helpers below are collectives there (every rank must call them, in the same order) and cheap
identities on plain tensors, so DDP and single-process runs take the same code path.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def is_sharded(params: Iterable[torch.Tensor]) -> bool:
    """True when the parameters are FSDP2 shards (DTensors)."""
    return any(isinstance(p, DTensor) for p in params)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathered from every rank for a DTensor)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a DTensor (the tensor itself otherwise)."""
    return t.to_local() if isinstance(t, DTensor) else t


def shard_like(whole: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``whole`` laid out like ``reference``: sliced onto its mesh for a DTensor, else moved."""
    whole = whole.to(device=reference.device, dtype=reference.dtype)
    if isinstance(reference, DTensor):
        return distribute_tensor(whole, reference.device_mesh, reference.placements)
    return whole


def full_state(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``{name: copy of the whole tensor on CPU}`` (a collective under FSDP2: call it on every rank)."""
    return {name: full_tensor(t.detach()).to("cpu", copy=True) for name, t in named_tensors}


def optimizer_state_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state as whole tensors keyed by parameter name (torch's DCP helper), on
    every rank. Keyed by name, a checkpoint resumes under any layout: FSDP2 on 8 GPUs, DDP or
    one process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    from torch.utils._pytree import tree_map_only

    state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    # plain CPU copies: gathered shards may sit on a device torch.load cannot map back ("cpu:0")
    return tree_map_only(torch.Tensor, lambda t: t.detach().to("cpu", copy=True), state)


def load_optimizer_state_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of :func:`optimizer_state_by_name`: each rank takes its slice of the whole state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
