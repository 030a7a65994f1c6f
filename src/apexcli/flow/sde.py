"""One denoising step of a rectified-flow model, with the log-probability of the step taken.

Pure tensor math: no diffusers, no model. The rollout (``flow.rollout``) and the training-side
recompute call the same functions, so the two agree bit for bit on the same inputs.

Conventions (docs/method/flow-grpo-parity.md). Rectified flow ``x_s = (1-s)·x0 + s·eps``, velocity
``v = eps - x0``, noise level ``s = sigma`` in [0, 1]. A step goes from ``s`` to ``s'`` with
``dt = s' - s < 0``. ``sigma`` / ``sigma_next`` may be python floats, 0-d tensors or ``[B]``
tensors (one timestep per sample, as the trainer draws them); they broadcast over the
latent dims.

Numerics. All step math runs in float32 whatever the dtype of ``x`` / ``velocity``; the new
sample is cast back to ``x.dtype`` *before* its log-prob is evaluated, so the log-prob is
that of the sample actually stored, and a recompute from the stored sample reproduces it.
A step whose std is exactly 0 (``noise_level = 0``, or CPS landing on ``s' = 0``) is a
deterministic map: it returns ``prev_sample = mean`` and reports ``log_prob = 0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Sigma = float | torch.Tensor

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass
class StepOutput:
    """The result of one step ``x_s -> x_s'``."""

    prev_sample: torch.Tensor
    """The new latent ``x_s'`` (dtype of the input ``x``)."""
    log_prob: torch.Tensor
    """``[B]`` float32: mean over the non-batch dims of log N(prev_sample; mean, std^2)."""
    mean: torch.Tensor
    """Float32 mean of the step's Gaussian, shape of ``x`` (the quantity the KL compares)."""
    std: torch.Tensor
    """Float32 std of the step's Gaussian, shape ``[B, 1, ..., 1]`` (same for every dim)."""
    noise_scale: torch.Tensor | None = None
    """Float32 ``[B, 1, ..., 1]``: the scale Flow-GRPO divides its KL by — ``sig_t`` for the SDE
    step (the std before the ``sqrt(-dt)`` factor), the std itself for CPS. None = ``std``."""
    noise_block: int = 1
    """Side of the latent blocks the step's noise is constant on (``sde_step_with_logprob``):
    the log-prob and the KL live in those block coordinates. 1 = ordinary per-element noise."""


def _column(sigma: Sigma, x: torch.Tensor) -> torch.Tensor:
    """``sigma`` as a float32 tensor of shape [B or 1, 1, ..., 1] on ``x``'s device."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if s.ndim == 0:
        s = s.reshape(1)
    if s.ndim != 1 or s.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"sigma must be a scalar or have shape [{x.shape[0]}], got {tuple(s.shape)}")
    return s.reshape(-1, *([1] * (x.ndim - 1)))


def _draw_noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like ``x`` in float32, drawn on the generator's device."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32).to(x.device)


def block_coordinates(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x`` [B, C, H, W] in the orthonormal basis of block-constant images: ``block`` x the mean
    of each ``block`` x ``block`` patch, float32 [B, C, H/block, W/block] (``x`` itself for 1)."""
    if block == 1:
        return x.float()
    return torch.nn.functional.avg_pool2d(x.float(), block) * block


def block_noise(x: torch.Tensor, block: int, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise projected onto block-constant images, shaped like ``x`` (float32).

    Its block coordinates are i.i.d. N(0, 1); every direction inside a block is left noise-free.
    """
    if block == 1:
        return _draw_noise(x, generator)
    coarse = _draw_noise(x[..., ::block, ::block], generator)
    return coarse.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1) / block


def project_to_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """The orthogonal projection of ``x`` onto block-constant images (each patch -> its mean)."""
    if block == 1:
        return x
    coarse = torch.nn.functional.avg_pool2d(x, block)
    return coarse.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``[B]`` mean over non-batch dims of ``-(x-mean)^2/(2 std^2) - log std - log sqrt(2 pi)``.

    Evaluated in float32. Samples whose ``std`` is 0 (a deterministic step) get 0.
    """
    sample, mean = sample.float(), mean.float()
    std = std.float().expand(sample.shape[0], *([1] * (sample.ndim - 1)))
    deterministic = std == 0
    safe_std = torch.where(deterministic, torch.ones_like(std), std)
    elem = -((sample - mean) ** 2) / (2 * safe_std**2) - torch.log(safe_std) - _LOG_SQRT_2PI
    log_prob = elem.mean(dim=tuple(range(1, sample.ndim)))
    return torch.where(deterministic.reshape(-1), torch.zeros_like(log_prob), log_prob)


def squared_error_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``[B]`` mean over non-batch dims of ``-(x-mean)^2``: Flow-GRPO's CPS log-prob convention.

    It differs from the Gaussian log-density by the factor ``1/(2 std^2)`` and by constants
    (which cancel in a ratio). Without the factor the gradient of a step scales with its std
    (small for low-noise steps) instead of with ``1/std`` (huge for them), so no single step
    dominates the update. Deterministic (``std == 0``) samples get 0.
    """
    sample, mean = sample.float(), mean.float()
    std = std.float().expand(sample.shape[0], *([1] * (sample.ndim - 1)))
    log_prob = (-((sample - mean) ** 2)).mean(dim=tuple(range(1, sample.ndim)))
    return torch.where((std == 0).reshape(-1), torch.zeros_like(log_prob), log_prob)


LOG_PROB_FORMS = {"gaussian": gaussian_log_prob, "squared_error": squared_error_log_prob}
"""How a step's log-prob is scored: the exact Gaussian density, or Flow-GRPO's CPS form."""


def _finish(
    mean: torch.Tensor,
    std: torch.Tensor,
    x: torch.Tensor,
    prev_sample: torch.Tensor | None,
    generator: torch.Generator | None,
    log_prob_form: str = "gaussian",
    noise_scale: torch.Tensor | None = None,
) -> StepOutput:
    """Sample (unless ``prev_sample`` is given) and score the sample under N(mean, std^2)."""
    std = std.expand(x.shape[0], *std.shape[1:])
    if prev_sample is None:
        noisy = mean + std * _draw_noise(x, generator)
        # Zero-std steps are exactly the mean (avoids 0 * inf surprises and keeps them exact).
        prev_sample = torch.where(std == 0, mean, noisy).to(x.dtype)
    log_prob = LOG_PROB_FORMS[log_prob_form](prev_sample, mean, std)
    if noise_scale is not None:
        noise_scale = noise_scale.expand(x.shape[0], *noise_scale.shape[1:])
    return StepOutput(prev_sample=prev_sample, log_prob=log_prob, mean=mean, std=std, noise_scale=noise_scale)


def sde_std_scale(sigma: Sigma, x: torch.Tensor, noise_level: float, sigma_max: float | None) -> torch.Tensor:
    """``sig_t = a·sqrt(s / (1 - s))`` as a [B or 1, 1, ...] float32 column.

    At ``s == 1`` the ratio is infinite; as Flow-GRPO does, only the *denominator* is replaced:
    ``sig_t = a·sqrt(1 / (1 - sigma_max))`` with ``sigma_max`` the first scheduler sigma below 1.
    """
    s = _column(sigma, x)
    if sigma_max is None:
        if bool((s >= 1.0).any()):
            raise ValueError("a step from sigma == 1 needs sigma_max, the first scheduler sigma below 1")
        denom = 1.0 - s
    else:
        if not 0.0 < float(sigma_max) < 1.0:
            raise ValueError(f"sigma_max must lie in (0, 1), got {sigma_max}")
        denom = torch.where(s >= 1.0, torch.full_like(s, 1.0 - float(sigma_max)), 1.0 - s)
    return noise_level * torch.sqrt(s / denom)


def sde_step_with_logprob(
    velocity: torch.Tensor,
    x: torch.Tensor,
    sigma: Sigma,
    sigma_next: Sigma,
    *,
    noise_level: float = 0.7,
    sigma_max: float | None = None,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise_block: int = 1,
) -> StepOutput:
    """Flow-GRPO's SDE step (its marginals match the probability-flow ODE)::

        sig_t = a * sqrt(s / (1 - s))            (denominator 1 - sigma_max when s == 1)
        mean  = x + [ v + sig_t^2 / (2 s) * P (x + (1 - s) v) ] * dt
        std   = sig_t * sqrt(-dt)
        x'    = mean + std * P noise             (noise ~ N(0, I); skipped if prev_sample given)
        logp  = mean over block coordinates of log N(x'; mean, std^2)

    ``a = noise_level``. Pass ``prev_sample`` to score a stored transition (training recompute);
    no noise is drawn then. ``generator`` seeds the noise.

    ``P`` is the identity (Flow-GRPO) unless ``noise_block = b > 1``: then ``P`` projects onto
    images constant on each b x b latent patch, so the step explores only the ``1/b^2`` of the
    latent dimensions that set coarse layout and colour. The marginals still match the ODE
    exactly: in the Fokker-Planck equation the diffusion ``sig^2/2 tr(P hess p)`` and the score
    correction ``-div(sig^2/2 P grad p)`` cancel for any constant symmetric ``P``, as they do for
    ``P = I``. Why: the gradient ``sum_i A_i noise_i`` carries every noise dimension the reward
    ignores as pure variance, and b^2 fewer of them can mean less variance per unit of signal
    (on ``mini`` at b = 4: 4x the signal fraction for brightness, nothing resolved for ocr;
    ``benchmarks/grad_signal.py``). The latent's height and width must be multiples of ``b``.
    """
    if noise_block < 1 or x.shape[-1] % noise_block or x.shape[-2] % noise_block:
        raise ValueError(f"noise_block {noise_block} must be >= 1 and divide the latent size {tuple(x.shape[-2:])}")
    s, s_next = _column(sigma, x), _column(sigma_next, x)
    dt = s_next - s
    xf, v = x.float(), velocity.float()
    sig_t = sde_std_scale(sigma, x, noise_level, sigma_max)
    correction = project_to_blocks(sig_t**2 / (2 * s) * (xf + (1 - s) * v), noise_block)
    mean = xf + (v + correction) * dt
    std = sig_t * torch.sqrt(-dt)
    if noise_block == 1:
        return _finish(mean, std, x, prev_sample, generator, noise_scale=sig_t)
    std = std.expand(x.shape[0], *std.shape[1:])
    if prev_sample is None:
        noisy = mean + std * block_noise(x, noise_block, generator)
        prev_sample = torch.where(std == 0, mean, noisy).to(x.dtype)
    # the density of the block coordinates: the only ones the step draws
    log_prob = gaussian_log_prob(block_coordinates(prev_sample, noise_block), block_coordinates(mean, noise_block), std)
    return StepOutput(
        prev_sample=prev_sample,
        log_prob=log_prob,
        mean=mean,
        std=std,
        noise_scale=sig_t.expand(x.shape[0], *sig_t.shape[1:]),
        noise_block=noise_block,
    )


def cps_step_with_logprob(
    velocity: torch.Tensor,
    x: torch.Tensor,
    sigma: Sigma,
    sigma_next: Sigma,
    *,
    noise_level: float = 0.7,
    sigma_max: float | None = None,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    log_prob_form: str = "squared_error",
    noise_block: int = 1,
) -> StepOutput:
    """Coefficient-preserving sampling (CPS) step::

        x0hat = x - s * v                    (predicted clean latent)
        x1hat = x + (1 - s) * v              (predicted noise)
        std   = s' * sin(a * pi / 2)
        mean  = (1 - s') * x0hat + sqrt(s'^2 - std^2) * x1hat
        x'    = mean + std * noise
        logp  = mean over dims of -(x' - mean)^2             log_prob_form = "squared_error" (default)
        logp  = mean over dims of log N(x'; mean, std^2)     log_prob_form = "gaussian"

    The default is Flow-GRPO's CPS convention. The exact Gaussian density scales each step's
    log-ratio by ``1/(2 std^2)``, with ``std = s' sin(a pi/2)`` from 0.68 (first step) down to
    ~0.01 (last stochastic step of 10): the last trained step then carries almost all of the
    gradient (measured by ``benchmarks/bench_train.py --step-share``). ``-log std`` and
    ``-log sqrt(2 pi)`` cancel in the ratio in either form. The two forms need different PPO
    clip ranges (Flow-GRPO uses 1e-5 with this one). ``sigma_max`` is accepted for a uniform
    signature and unused. At ``s' = 0`` the std is 0 and the step is the deterministic
    ``x0hat`` (log-prob reported as 0). ``noise_block`` exists for a uniform signature: CPS
    draws per-element noise only.
    """
    del sigma_max  # CPS has no singularity at s == 1
    if noise_block != 1:
        raise ValueError(f"noise_block {noise_block} needs the sde step; CPS draws per-element noise")
    s, s_next = _column(sigma, x), _column(sigma_next, x)
    xf, v = x.float(), velocity.float()
    x0_hat = xf - s * v
    x1_hat = xf + (1 - s) * v
    std = s_next * math.sin(noise_level * math.pi / 2)
    # clamp: s'^2 - std^2 = s'^2 cos^2(a pi/2) >= 0 mathematically; rounding can dip below 0.
    mean = (1 - s_next) * x0_hat + torch.sqrt((s_next**2 - std**2).clamp_min(0)) * x1_hat
    if log_prob_form not in LOG_PROB_FORMS:
        raise ValueError(f"log_prob_form must be one of {', '.join(LOG_PROB_FORMS)}, got '{log_prob_form}'")
    return _finish(mean, std, x, prev_sample, generator, log_prob_form)


def ode_step(velocity: torch.Tensor, x: torch.Tensor, sigma: Sigma, sigma_next: Sigma) -> torch.Tensor:
    """Euler step of the probability-flow ODE: ``x' = x + v * (s' - s)`` (for evaluation).

    Computed in float32, returned in ``x.dtype``.
    """
    dt = _column(sigma_next, x) - _column(sigma, x)
    return (x.float() + velocity.float() * dt).to(x.dtype)


def gaussian_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor, noise_block: int = 1) -> torch.Tensor:
    """``[B]`` KL(N(mean, std^2) || N(mean_ref, std^2)) per dim, averaged over non-batch dims::

        KL = mean over dims of (mean - mean_ref)^2 / (2 std^2)

    With ``noise_block > 1`` the dims are the block coordinates the step's noise lives in
    (``sde_step_with_logprob``): the KL of the distributions of those coordinates.

    Pass ``StepOutput.std`` for the exact KL of the two step distributions. Flow-GRPO divides
    by ``sig_t^2`` instead (``StepOutput.noise_scale``): for the SDE step that is ``1/|dt|``
    times smaller (train.kl_form chooses; ``train.loss.step_kl``). ``std`` must be > 0 (train
    only stochastic steps). Evaluated in float32.
    """
    diff = block_coordinates(mean.float() - mean_ref.float(), noise_block)
    std = std.float()
    return (diff**2 / (2 * std**2)).mean(dim=tuple(range(1, diff.ndim)))


def _cps_gaussian(*args, **kwargs) -> StepOutput:
    return cps_step_with_logprob(*args, log_prob_form="gaussian", **kwargs)


STEP_FUNCTIONS = {"sde": sde_step_with_logprob, "cps": cps_step_with_logprob, "cps_gaussian": _cps_gaussian}
"""Stochastic samplers by name (``ode`` is deterministic and has no log-prob). ``cps`` scores
steps in Flow-GRPO's ``-(x'-mean)^2`` form, ``cps_gaussian`` with the full Gaussian density."""
