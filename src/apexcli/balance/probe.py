"""Gradient probe: the Gram matrix of the per-objective policy gradients on the LoRA parameters.

Used by apex (exact conflict term) and mgda (min-norm weights). The trainer wraps a loss on a
small sub-batch at one sampled timestep as ``loss_for_advantages(adv) -> scalar``; the probe
calls it once per objective with that objective's normalized advantages (K backward passes).

Sharded parameters (FSDP2) take :func:`gradient_gram_by_backward`: ``autograd.grad`` cannot
reach a shard through FSDP's gather, so each objective gets its own forward and ``backward()``,
whose hooks reduce-scatter the gradient; the Gram of the local slices is then summed over ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from apexcli.balance.priorities import gram_to_cosine

__all__ = ["gradient_gram", "gradient_gram_by_backward", "gram_to_cosine", "spread_over_groups"]


def spread_over_groups(group_ids: Sequence[int], n: int) -> list[int]:
    """The indices of ``n`` samples taken round-robin over the groups (in order of appearance).

    The probe's sub-batch must hold several prompts: gradients from one prompt cannot show the
    conflict between objectives learned on different prompts (quality taught on shapes, ocr on
    signs), and an objective masked on that prompt has a zero gradient there.
    """
    members: dict[int, list[int]] = {}
    for i, g in enumerate(int(x) for x in group_ids):
        members.setdefault(g, []).append(i)
    picked: list[int] = []
    for rank in range(max((len(m) for m in members.values()), default=0)):
        for m in members.values():
            if rank < len(m) and len(picked) < n:
                picked.append(m[rank])
    return sorted(picked)


def gradient_gram(
    loss_for_advantages: Callable[[torch.Tensor], torch.Tensor],
    per_objective_advantages: torch.Tensor,
    params: Sequence[torch.Tensor],
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    shared_graph: bool = True,
) -> torch.Tensor:
    """Gram[k, j] = <g_k, g_j>, g_k = d loss_for_advantages(A[:, k]) / d params, flattened.

    Args:
        loss_for_advantages: maps advantages [n] to a scalar loss; may reuse one forward graph
            across calls (the graph is retained until the last objective).
        per_objective_advantages: [n, K] (e.g. ``info["per_objective"]`` of the sub-batch).
        params: the trainable tensors (LoRA); a parameter the loss does not reach has gradient 0.
        reduce: optional map applied to the stacked flattened gradients [K, P] before the Gram,
            e.g. a cross-rank mean, so every rank gets the Gram of the global gradients.
        shared_graph: False when ``loss_for_advantages`` runs a fresh forward on every call, so
            no graph is retained (compiled backward functions refuse ``retain_graph``).

    Returns:
        [K, K] float64 on CPU, symmetric positive semi-definite.
    """
    params = [p for p in params]
    if not params:
        raise ValueError("gradient_gram needs at least one parameter tensor")
    adv = per_objective_advantages
    k = adv.shape[1]
    flat: list[torch.Tensor] = []
    for j in range(k):
        loss = loss_for_advantages(adv[:, j])
        grads = torch.autograd.grad(loss, params, retain_graph=shared_graph and j < k - 1, allow_unused=True)
        flat.append(_flatten(grads, params))
    stacked = torch.stack(flat)  # [K, P]
    if reduce is not None:
        stacked = reduce(stacked)
    stacked = stacked.to(torch.float64)
    return (stacked @ stacked.T).cpu()


def gradient_gram_by_backward(
    loss_for_advantages: Callable[[torch.Tensor], torch.Tensor],
    per_objective_advantages: torch.Tensor,
    params: Sequence[torch.Tensor],
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The Gram of :func:`gradient_gram` for parameters sharded across ranks (FSDP2 DTensors).

    ``loss_for_advantages`` must run its own forward on every call (one graph per objective).
    The parameters' ``.grad`` must be empty on entry (between optimizer steps) and is emptied
    again on return. Returns [K, K] float64 on CPU, equal on every rank.
    """
    from apexcli.sharding import local_tensor

    params = [p for p in params]
    if not params:
        raise ValueError("gradient_gram_by_backward needs at least one parameter tensor")
    flat: list[torch.Tensor] = []
    for j in range(per_objective_advantages.shape[1]):
        loss_for_advantages(per_objective_advantages[:, j]).backward()
        flat.append(
            _flatten(
                [None if p.grad is None else local_tensor(p.grad) for p in params], [local_tensor(p) for p in params]
            )
        )
        for p in params:
            p.grad = None
    stacked = torch.stack(flat).to(torch.float64)  # [K, P_local]: this rank's slice of every gradient
    return all_reduce_sum(stacked @ stacked.T).cpu()


def _flatten(grads: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor]) -> torch.Tensor:
    """One float32 vector of the gradients, zeros for a parameter the loss did not reach."""
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).float() for g, p in zip(grads, params)])
