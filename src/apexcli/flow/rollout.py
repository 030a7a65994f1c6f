"""Rollouts with trajectory capture, and the training-side log-prob recompute.

Glue between the step math in ``flow.sde`` and a model family's transformer and scheduler
(``apexcli.backbones``: the family decides the velocity call, the sigmas and the latent
channels; the trajectory always holds unpacked latents ``[B, C, h, w]``). For SD3 it mirrors
the conventions of diffusers **0.39**'s ``StableDiffusion3Pipeline.__call__``:

- sigmas from ``scheduler.set_timesteps(num_steps)`` -> ``scheduler.sigmas`` ([T+1], ends in 0;
  with ``use_dynamic_shifting`` the same ``mu`` the pipeline computes from the latent size);
- the transformer is called with ``timestep = 1000 * sigma`` (the scheduler's
  ``timesteps = sigmas * num_train_timesteps``), ``encoder_hidden_states``,
  ``pooled_projections``, ``return_dict=False``, and predicts the velocity ``eps - x0``;
- CFG batches ``[uncond, cond]`` in one forward and combines ``v_u + g * (v_c - v_u)``;
- decoding undoes ``(z - shift_factor) * scaling_factor`` before ``vae.decode``.

Deviations, on purpose:

- ``scheduler.step`` is never called: the step (SDE, CPS or Euler ODE) and its log-prob are
  ours (``flow.sde``), so sampling and training share the exact numerics;
- the latent chain is kept in float32 whatever the transformer's dtype (only the transformer
  input is cast), and the CFG combination runs in float32;
- no skip-layer guidance, IP-adapter or ``joint_attention_kwargs``; images stay a float
  tensor on the device (no PIL).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from apexcli.backbones import backbone_of
from apexcli.backbones.base import model_dtype as _model_dtype
from apexcli.backbones.base import unwrap_model
from apexcli.backbones.sd3 import TIMESTEP_SCALE  # noqa: F401  (re-exported)
from apexcli.backbones.sd3 import scheduler_sigmas as _scheduler_sigmas  # noqa: F401  (re-exported)
from apexcli.conditioning import PromptEmbeds, to_device
from apexcli.errors import ApexError
from apexcli.flow.sde import STEP_FUNCTIONS, StepOutput, ode_step

SAMPLERS = ("sde", "cps", "cps_gaussian", "ode")


# --------------------------------------------------------------------------- velocity


def predict_velocity(
    transformer: torch.nn.Module,
    x: torch.Tensor,
    sigma: float | torch.Tensor,
    cond: PromptEmbeds,
    *,
    guidance_scale: float = 1.0,
    uncond: PromptEmbeds | None = None,
    true_cfg_scale: float = 1.0,
) -> torch.Tensor:
    """Float32 velocity ``v = eps - x0`` at the unpacked latent ``x`` (noise level ``sigma``:
    scalar or ``[B]``), by the transformer's family (``apexcli.backbones``).

    SD3, ``guidance_scale > 1``: classifier-free guidance ``v = v_u + g * (v_c - v_u)`` from ONE
    forward over the batch ``[uncond, cond]`` (``uncond`` may have batch 1, it is broadcast);
    ``guidance_scale <= 1``: one conditional forward. FLUX: one conditional forward, the
    guidance an input embedding (dev) or none (schnell); ``true_cfg_scale > 1`` adds true CFG
    against ``uncond``, ``v = v_u + s * (v_c - v_u)``, from one forward over ``[uncond, cond]``.
    """
    return backbone_of(transformer).velocity(
        transformer, x, sigma, cond, guidance_scale=guidance_scale, uncond=uncond, true_cfg_scale=true_cfg_scale
    )


def latent_channels(transformer: torch.nn.Module) -> int:
    """Channels of the unpacked latent a rollout of ``transformer`` starts from."""
    return backbone_of(transformer).latent_channels(unwrap_model(transformer).config)


# --------------------------------------------------------------------------- trajectories


@dataclass
class Trajectory:
    """Everything a rollout keeps for the policy update."""

    latents: torch.Tensor
    """``[B, T+1, C, h, w]`` float32; ``latents[:, 0]`` the initial noise, ``latents[:, T]`` the final latent."""
    log_probs: torch.Tensor
    """``[B, T]`` float32 log-prob of each transition (0 for steps run deterministically)."""
    sigmas: torch.Tensor
    """``[T+1]`` CPU float32 noise levels, ``sigmas[T] == 0``."""
    sde_mask: torch.Tensor
    """``[T]`` CPU bool: which steps were stochastic (the only ones with a log-prob to train)."""
    sampler: str
    """``sde``, ``cps``, ``cps_gaussian`` or ``ode``: the step used for the stochastic steps."""
    noise_level: float
    """The noise level ``a`` of the stochastic steps."""
    sigma_max: float
    """First scheduler sigma below 1 (stands in for the SDE's ``1 - s`` denominator at ``s == 1``)."""
    noise_block: int = 1
    """Latent block side the SDE steps' noise is constant on (``flow.sde``; 1 = per element)."""

    @property
    def step_options(self) -> dict:
        """What ``step_log_prob`` needs to score this trajectory's steps: ``**traj.step_options``."""
        return {
            "sampler": self.sampler,
            "noise_level": self.noise_level,
            "sigma_max": self.sigma_max,
            "noise_block": self.noise_block,
        }

    @property
    def final(self) -> torch.Tensor:
        """``[B, C, h, w]`` the denoised latent (decode it with ``decode_latents``)."""
        return self.latents[:, -1]

    @property
    def num_steps(self) -> int:
        return self.log_probs.shape[1]

    def __len__(self) -> int:
        return self.latents.shape[0]

    def transition(self, t: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """``(x_t, x_{t+1}, sigma_t, sigma_{t+1})`` of step ``t`` for every sample."""
        return self.latents[:, t], self.latents[:, t + 1], float(self.sigmas[t]), float(self.sigmas[t + 1])

    def index(self, idx: slice | torch.Tensor | Sequence[int]) -> Trajectory:
        """The samples ``idx`` (sigmas and mask are shared)."""
        if not isinstance(idx, (slice, torch.Tensor)):
            idx = torch.as_tensor(list(idx), dtype=torch.long)
        if isinstance(idx, torch.Tensor):
            idx = idx.to(self.latents.device)
        return replace(self, latents=self.latents[idx], log_probs=self.log_probs[idx])

    __getitem__ = index

    @staticmethod
    def cat(items: Sequence[Trajectory]) -> Trajectory:
        """One trajectory of every sample of ``items`` (rollouts of one sampler; the first's settings)."""
        if len(items) == 1:
            return items[0]
        return replace(
            items[0], latents=torch.cat([t.latents for t in items]), log_probs=torch.cat([t.log_probs for t in items])
        )


def first_sigma_below_one(sigmas: torch.Tensor) -> float:
    """``sigma_max`` of ``flow.sde``: the first scheduler sigma strictly below 1."""
    below = sigmas[sigmas < 1.0]
    return float(below[0])


def initial_noise(
    n: int,
    shape: Sequence[int],
    *,
    generator: torch.Generator | None = None,
    group_ids: Sequence[int] | torch.Tensor | None = None,
    share_within_group: bool = False,
    seed: int | None = None,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``[n, *shape]`` standard-normal starting latents.

    ``share_within_group``: every sample with the same ``group_ids`` entry starts from the same
    noise (GRPO groups then differ only by the SDE noise); groups are drawn in order of first
    appearance from ``generator``. With ``seed`` instead, group ``g``'s noise comes from its
    own generator seeded with ``(seed, g)``, so a group split across ranks gets the same noise
    on every rank.
    """
    shape = tuple(shape)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if not share_within_group:
        return to_device(
            torch.randn((n, *shape), generator=generator, device=gen_device, dtype=torch.float32), device
        ).to(dtype)
    if group_ids is None:
        raise ValueError("share_within_group needs group_ids")
    ids = [int(g) for g in (group_ids.tolist() if isinstance(group_ids, torch.Tensor) else group_ids)]
    if len(ids) != n:
        raise ValueError(f"got {len(ids)} group ids for {n} samples")
    unique = list(dict.fromkeys(ids))
    if seed is None:
        per_group = torch.randn((len(unique), *shape), generator=generator, device=gen_device, dtype=torch.float32)
    else:
        per_group = torch.stack(
            [
                torch.randn(
                    shape, generator=torch.Generator().manual_seed((seed * 1_000_003 + g) % 2**63), dtype=torch.float32
                )
                for g in unique
            ]
        )
    slot = {g: i for i, g in enumerate(unique)}
    picks = torch.tensor([slot[g] for g in ids], dtype=torch.long, device=per_group.device)
    return to_device(per_group[picks], device).to(dtype)


def _stochastic_mask(
    sigmas: torch.Tensor, sampler: str, noise_level: float, sde_steps: Sequence[int] | None
) -> torch.Tensor:
    """``[T]`` bool: steps that draw noise. CPS onto ``s' = 0`` has zero std, so it is deterministic."""
    num_steps = sigmas.numel() - 1
    mask = torch.zeros(num_steps, dtype=torch.bool)
    if sampler == "ode" or noise_level == 0:
        return mask
    if sde_steps is None:
        mask[:] = True
    else:
        for i in sde_steps:
            if not 0 <= int(i) < num_steps:
                raise ValueError(f"sde_steps index {i} outside 0..{num_steps - 1}")
            mask[int(i)] = True
    if sampler.startswith("cps"):
        mask &= sigmas[1:] > 0
    return mask


@torch.no_grad()
def rollout(
    transformer: torch.nn.Module,
    scheduler,
    cond: PromptEmbeds,
    *,
    num_steps: int,
    height: int,
    width: int,
    vae_scale_factor: int,
    guidance_scale: float = 1.0,
    uncond: PromptEmbeds | None = None,
    true_cfg_scale: float = 1.0,
    sampler: str = "sde",
    noise_level: float = 0.7,
    sde_steps: Sequence[int] | None = None,
    initial_noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise_block: int = 1,
) -> Trajectory:
    """Sample ``len(cond)`` latents with ``num_steps`` steps and keep the whole trajectory.

    Image size ``height x width`` pixels; the latent is ``C x height/f x width/f`` (``latent_channels``) with
    ``f = vae_scale_factor`` (``pipe.vae_scale_factor``: 8 for SD3, 2 for the tiny pipeline).
    ``sampler`` picks the stochastic step (``sde``, ``cps``, ``cps_gaussian``; ``ode`` = Euler
    everywhere); ``sde_steps`` lists the step indices that are stochastic (None: all), the rest
    run the ODE step (the "fast"/MixGRPO window). ``initial_noise`` ``[B, C, h, w]`` overrides
    the starting latent (see ``initial_noise()`` for group-shared noise); otherwise it is drawn
    from ``generator``, which also drives the step noise. ``noise_block`` > 1 (``sde`` only)
    makes the step noise constant on latent blocks of that side (``flow.sde``).
    ``true_cfg_scale``: FLUX's true CFG (``predict_velocity``).
    """
    if sampler not in SAMPLERS:
        raise ApexError(f"unknown sampler '{sampler}': use one of {', '.join(SAMPLERS)}")
    if noise_block != 1 and sampler != "sde":
        raise ApexError(f"sampling.experimental.noise_block={noise_block} needs sampling.sampler=sde (got {sampler})")
    backbone = backbone_of(transformer)
    config = unwrap_model(transformer).config
    patch = backbone.patch_size(config)
    multiple = vae_scale_factor * patch
    if height % multiple or width % multiple:
        raise ApexError(f"image size {height}x{width} must be a multiple of {multiple} (VAE factor x patch size)")
    latent_hw = (height // vae_scale_factor, width // vae_scale_factor)
    if latent_hw[0] % noise_block or latent_hw[1] % noise_block:
        raise ApexError(
            f"sampling.experimental.noise_block={noise_block} must divide the latent size {latent_hw[0]}x{latent_hw[1]}"
        )
    batch = len(cond)
    device = cond.prompt_embeds.device

    sigmas = backbone.sigmas(scheduler, num_steps, latent_hw, patch)
    sigma_max = first_sigma_below_one(sigmas)
    mask = _stochastic_mask(sigmas, sampler, noise_level, sde_steps)

    shape = (batch, backbone.latent_channels(config), *latent_hw)
    if initial_noise is None:
        gen_device = generator.device if generator is not None else device
        x = to_device(torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32), device)
    else:
        if tuple(initial_noise.shape) != shape:
            raise ValueError(f"initial_noise has shape {tuple(initial_noise.shape)}, expected {shape}")
        x = to_device(initial_noise, device).to(torch.float32)

    latents = torch.empty((batch, num_steps + 1, *shape[1:]), dtype=torch.float32, device=device)
    log_probs = torch.zeros((batch, num_steps), dtype=torch.float32, device=device)
    latents[:, 0] = x
    step_fn = STEP_FUNCTIONS.get(sampler)
    # the noise levels on the device once: a host-to-device copy per step would stall the CPU
    # until the GPU drains, every step (the mask stays on the CPU: it steers Python control flow)
    sigmas_on_device = to_device(sigmas, device)
    for i in range(num_steps):
        s, s_next = sigmas_on_device[i], sigmas_on_device[i + 1]
        v = predict_velocity(
            transformer, x, s, cond, guidance_scale=guidance_scale, uncond=uncond, true_cfg_scale=true_cfg_scale
        )
        if mask[i]:
            out = step_fn(
                v,
                x,
                s,
                s_next,
                noise_level=noise_level,
                sigma_max=sigma_max,
                generator=generator,
                noise_block=noise_block,
            )
            x = out.prev_sample
            log_probs[:, i] = out.log_prob
        else:
            x = ode_step(v, x, s, s_next)
        latents[:, i + 1] = x
    return Trajectory(
        latents=latents,
        log_probs=log_probs,
        sigmas=sigmas,
        sde_mask=mask,
        sampler=sampler,
        noise_level=float(noise_level),
        sigma_max=sigma_max,
        noise_block=int(noise_block),
    )


def step_log_prob(
    transformer: torch.nn.Module,
    x: torch.Tensor,
    x_next: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    cond: PromptEmbeds,
    *,
    guidance_scale: float = 1.0,
    uncond: PromptEmbeds | None = None,
    true_cfg_scale: float = 1.0,
    sampler: str = "sde",
    noise_level: float = 0.7,
    sigma_max: float | None = None,
    noise_block: int = 1,
) -> StepOutput:
    """Training-side recompute (with grad) of the log-prob of the stored transition ``x -> x_next``.

    Same velocity and step math as ``rollout``, so on-policy ``exp(logp - logp_old) == 1``.
    ``sigma``/``sigma_next`` scalar or ``[B]`` (per-sample timesteps); pass the trajectory's
    ``step_options`` (sampler, noise level, ``sigma_max``, ``noise_block``). ``StepOutput.mean`` / ``.std`` feed
    ``gaussian_kl`` against the same call made with the LoRA disabled.
    """
    if sampler not in STEP_FUNCTIONS:
        raise ValueError(f"sampler '{sampler}' has no log-prob; use one of {', '.join(STEP_FUNCTIONS)}")
    v = predict_velocity(
        transformer, x, sigma, cond, guidance_scale=guidance_scale, uncond=uncond, true_cfg_scale=true_cfg_scale
    )
    return STEP_FUNCTIONS[sampler](
        v,
        x,
        sigma,
        sigma_next,
        noise_level=noise_level,
        sigma_max=sigma_max,
        prev_sample=x_next,
        noise_block=noise_block,
    )


@torch.no_grad()
def decode_latents(vae: torch.nn.Module, latents: torch.Tensor, *, batch_size: int | None = None) -> torch.Tensor:
    """Float32 images ``[B, 3, H, W]`` in [0, 1] on the latents' device.

    ``image = (vae.decode(z / scaling_factor + shift_factor) / 2 + 0.5).clamp(0, 1)``;
    ``batch_size`` decodes in chunks to bound memory.
    """
    shift = vae.config.shift_factor or 0.0
    scale = vae.config.scaling_factor
    dtype = _model_dtype(vae)
    chunks = [latents] if batch_size is None else latents.split(batch_size)
    images = []
    for z in chunks:
        z = (z.float() / scale + shift).to(dtype)
        images.append(vae.decode(z, return_dict=False)[0].float())
    return (torch.cat(images) / 2 + 0.5).clamp(0, 1)
