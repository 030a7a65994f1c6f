"""The policy losses: GRPO (PPO-clip on per-step log-probs, with a KL penalty to the base model)
and the negative-aware flow-matching loss (``train.loss=nft``).

    ratio = exp(logp_theta - logp_old)
    loss  = mean_i max(-A_i * ratio_i, -A_i * clip(ratio_i, 1 - eps, 1 + eps)) + beta * mean_i KL_i

The log-probs are means over latent dims (flow.sde), so sensible clip ranges are tiny (1e-4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from apexcli.flow.sde import StepOutput, gaussian_kl

KL_FORMS = ("exact", "reference")


@dataclass
class PolicyLossOutput:
    loss: torch.Tensor
    """Scalar to backpropagate."""
    policy_loss: torch.Tensor
    """The PPO-clip term (detached)."""
    kl: torch.Tensor
    """Mean KL to the reference (detached; 0 when beta == 0)."""
    ratio_mean: torch.Tensor
    """Mean importance ratio (detached): 1 on-policy."""
    clip_frac: torch.Tensor
    """Fraction of samples whose ratio left [1 - eps, 1 + eps] (detached)."""


def step_kl(out: StepOutput, ref: StepOutput, form: str = "exact") -> torch.Tensor:
    """``[B]`` KL penalty of one step between the policy (``out``) and the base model (``ref``).

        exact:      mean_dims (mean - mean_ref)^2 / (2 std^2)        std = the step's std
        reference:  mean_dims (mean - mean_ref)^2 / (2 sig_t^2)      Flow-GRPO's train_sd3.py

    For the SDE step ``std = sig_t sqrt(|dt|)``, so ``exact = reference / |dt|``: 25x at the first
    of SD3.5-M's 10 steps (shift 3), 3.7x at the ninth, 13x on average. A ``kl_beta`` copied from
    Flow-GRPO means the ``reference`` form. For CPS both forms divide by the step's std.
    """
    if form == "exact" or out.noise_scale is None:
        return gaussian_kl(out.mean, ref.mean, out.std, out.noise_block)
    if form == "reference":
        return gaussian_kl(out.mean, ref.mean, out.noise_scale, out.noise_block)
    raise ValueError(f"KL form must be one of {', '.join(KL_FORMS)}, got '{form}'")


def velocity_anchor(velocity: torch.Tensor, velocity_ref: torch.Tensor) -> torch.Tensor:
    """``[B]`` mean squared difference between the policy's and the base model's velocity.

    Used at steps outside the trained window, which are sampled by the ODE and carry no log-prob:
    a LoRA trained at one step still moves every other, and nothing else there holds it back.
    """
    return (velocity - velocity_ref).square().flatten(1).mean(dim=1)


def clip_advantages(advantages: torch.Tensor, limit: float) -> torch.Tensor:
    return advantages.clamp(-limit, limit) if limit > 0 else advantages


def grpo_policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_range: float,
    kl: torch.Tensor | None = None,
    kl_beta: float = 0.0,
) -> PolicyLossOutput:
    """All tensors ``[B]``; ``advantages`` already clipped. ``kl`` per sample or None."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.maximum(unclipped, clipped).mean()
    kl_mean = kl.mean() if kl is not None else torch.zeros((), device=log_prob.device)
    loss = policy_loss + kl_beta * kl_mean if kl is not None and kl_beta > 0 else policy_loss
    with torch.no_grad():
        clip_frac = ((ratio - 1.0).abs() > clip_range).float().mean()
    return PolicyLossOutput(
        loss=loss,
        policy_loss=policy_loss.detach(),
        kl=kl_mean.detach(),
        ratio_mean=ratio.detach().mean(),
        clip_frac=clip_frac,
    )


@dataclass
class NftLossOutput:
    loss: torch.Tensor
    """Scalar to backpropagate (0 on-policy: the loss less its constant part)."""
    flow_error: torch.Tensor
    """Mean ``|v_old - target|^2`` over the batch (detached): the flow-matching error of the samples."""
    drift: torch.Tensor
    """Mean ``|v - v_old|^2`` (detached): how far the policy has moved from the rollout's."""


def nft_weight(advantages: torch.Tensor, scale: float) -> torch.Tensor:
    """``w = 2 r - 1 = clamp(A / scale, -1, 1)``: r is the probability that a sample is "good"."""
    return (advantages / scale).clamp(-1.0, 1.0)


def nft_loss(
    velocity: torch.Tensor,
    velocity_old: torch.Tensor,
    target: torch.Tensor,
    advantages: torch.Tensor,
    *,
    beta: float,
    adv_scale: float,
) -> NftLossOutput:
    """Negative-aware flow matching on the policy's own samples (the idea of DiffusionNFT,
    arXiv 2509.16117), written for our advantages.

    Each sample x0 is noised to ``x_t = (1 - t) x0 + t eps`` with target ``eps - x0``. With the
    rollout policy's velocity ``v_old`` and ``d = v - v_old``, the implicit positive and negative
    policies ``v_old + beta d`` and ``v_old - beta d`` are fitted to good and bad samples:

        loss_i = ( r_i |v_old + beta d - target|^2 + (1 - r_i) |v_old - beta d - target|^2 ) / beta
               = const + beta |d|^2 + 2 w_i <v_old - target, d>          w_i = 2 r_i - 1

    (``|.|^2`` a mean over latent dims; the constant is dropped.) On-policy (d = 0) the gradient is
    ``w_i * grad |v - target|^2``: advantage-weighted flow matching, first-order in the model, where
    GRPO's score-function gradient correlates the reward with every latent dim of the step noise.
    Off-policy, ``beta |d|^2`` is a trust region: the minimiser is ``d = -w (v_old - target) / beta``,
    so a larger ``beta`` takes smaller steps. Tensors ``[B, ...]``; ``advantages`` ``[B]``.
    """
    dims = tuple(range(1, velocity.dim()))
    residual = (velocity_old - target).detach()
    drift = velocity - velocity_old.detach()
    w = nft_weight(advantages, adv_scale).to(velocity.dtype)
    per_sample = beta * drift.square().mean(dim=dims) + 2.0 * w * (residual * drift).mean(dim=dims)
    return NftLossOutput(
        loss=per_sample.mean(),
        flow_error=residual.square().mean(dim=dims).mean(),
        drift=drift.detach().square().mean(dim=dims).mean(),
    )
