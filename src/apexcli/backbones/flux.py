"""FLUX.1 (dev and schnell): a guidance-distilled MMDiT on 2x2-packed latent tokens.

Mirrors diffusers' ``FluxPipeline.__call__``:

- the 16-channel latent ``[B, C, h, w]`` goes in as ``(h/2)(w/2)`` tokens of ``4C`` channels
  (``_pack_latents``) with position ids ``(0, row, col)`` per token and zero ids per text token;
- sigmas ``linspace(1, 1/T, T)`` through ``set_timesteps(sigmas=..., mu=...)`` with ``mu`` from
  ``calculate_shift`` of the token count: FLUX.1-dev's scheduler shifts by it (the
  resolution-dependent dynamic shift); schnell's (``use_dynamic_shifting`` off, shift 1) ignores
  it and keeps the plain linspace, as the pipeline's own call does;
- ``timestep = sigma`` (the pipeline's ``t / 1000``), not ``1000 * sigma`` as SD3;
- FLUX.1-dev (``guidance_embeds``) takes ``guidance_scale`` as an input embedding, so one
  conditional forward; schnell takes no guidance at all;
- true CFG (``true_cfg_scale > 1``, off by default): a negative-prompt forward besides the
  conditional one, both with the distilled guidance, ``v = v_neg + s * (v_cond - v_neg)``.

Deviations, on purpose: the two true-CFG forwards run as ONE batch ``[neg, cond]`` (as SD3's CFG;
on tiny-flux in float32 on a CPU bit-identical to diffusers' two calls, in bfloat16 apart by
bfloat16 rounding, 0.016 on velocities up to 2.3) and are combined in float32; no IP-adapter; the
rollout keeps the latent unpacked so the step math, noise blocks and decoding are the
family-independent ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from apexcli.backbones.base import (
    JOINT_ATTENTION_PROJECTIONS,
    Backbone,
    dynamic_shift_mu,
    model_dtype,
    unwrap_model,
)

PATCH = 2
"""Latent pixels per token side: FLUX packs 2x2 latent pixels into one token."""


def pack(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` -> ``[B, (h/2)(w/2), 4C]``, the token order of ``FluxPipeline._pack_latents``."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of ``pack``: ``[B, (h/2)(w/2), 4C]`` -> ``[B, C, h, w]``."""
    b, _, channels = tokens.shape
    x = tokens.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels // 4, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``[(h/2)(w/2), 3]`` rotary position ids ``(0, row, col)`` of the packed tokens, made on
    ``device``: built on the host, they were a host-to-device copy, a sync on a GPU, every forward."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device)
    ids[..., 1] += torch.arange(h // 2, device=device)[:, None]
    ids[..., 2] += torch.arange(w // 2, device=device)[None, :]
    return ids.reshape(-1, 3).to(dtype)


def scheduler_sigmas(scheduler, num_steps: int, latent_hw: tuple[int, int]) -> torch.Tensor:
    """``[T+1]`` CPU float32 sigmas, set up as ``FluxPipeline`` does."""
    seq_len = (latent_hw[0] // PATCH) * (latent_hw[1] // PATCH)
    mu = dynamic_shift_mu(scheduler, seq_len, max_shift=1.15)
    sigmas = None if scheduler.config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_steps, num_steps)
    if sigmas is None:
        scheduler.set_timesteps(num_steps, device="cpu", mu=mu)
    else:
        scheduler.set_timesteps(device="cpu", sigmas=sigmas, mu=mu)
    return scheduler.sigmas.detach().to("cpu", torch.float32).clone()


class FluxBackbone(Backbone):
    family = "flux"
    pipeline_class = "FluxPipeline"
    transformer_class = "FluxTransformer2DModel"
    default_lora_targets = JOINT_ATTENTION_PROJECTIONS  # also the single-stream blocks' to_q/k/v
    takes_true_cfg = True  # dev and schnell alike

    def latent_channels(self, config) -> int:
        return int(config.in_channels) // (PATCH * PATCH)

    def patch_size(self, config) -> int:
        return PATCH

    def sigmas(self, scheduler, num_steps: int, latent_hw: tuple[int, int], patch: int) -> torch.Tensor:
        return scheduler_sigmas(scheduler, num_steps, latent_hw)

    def velocity(
        self, transformer, x, sigma, cond, *, guidance_scale=1.0, uncond=None, true_cfg_scale=1.0
    ) -> torch.Tensor:
        """One conditional forward; ``guidance_scale`` is the distilled guidance embedding of
        FLUX.1-dev (ignored by schnell, which has none). ``true_cfg_scale > 1``: true CFG against
        ``uncond`` (the negative prompt; batch 1 is broadcast) from one forward over ``[neg, cond]``."""
        batch, _, h, w = x.shape
        dtype = model_dtype(transformer)
        config = unwrap_model(transformer).config
        cond = cond.expand(batch)
        true_cfg = true_cfg_scale > 1.0
        text, pooled, hidden = cond.prompt_embeds, cond.pooled, x
        if true_cfg:
            if uncond is None:
                raise ValueError("true_cfg_scale > 1 needs the negative-prompt embeddings (uncond)")
            uncond = uncond.expand(batch)
            text = torch.cat([uncond.prompt_embeds.to(text.device), text])
            pooled = torch.cat([uncond.pooled.to(pooled.device), pooled])
            hidden = torch.cat([x, x])
        n = hidden.shape[0]
        s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(batch)
        # the pipeline passes its scheduler timestep (1000 * sigma) in the model dtype, divided by 1000
        t = (s * 1000.0).to(dtype) / 1000
        if true_cfg:
            t = torch.cat([t, t])
        guidance = None
        if config.guidance_embeds:
            guidance = torch.full((n,), float(guidance_scale), dtype=torch.float32, device=x.device)
        text = text.to(device=x.device, dtype=dtype)
        out = transformer(
            hidden_states=pack(hidden.to(dtype)),
            timestep=t,
            guidance=guidance,
            pooled_projections=pooled.to(device=x.device, dtype=dtype),
            encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3, device=x.device, dtype=dtype),
            img_ids=image_ids(h, w, x.device, dtype),
            return_dict=False,
        )[0]
        v = unpack(out.float(), h, w)
        if true_cfg:
            v_neg, v_cond = v.chunk(2)
            return v_neg + true_cfg_scale * (v_cond - v_neg)
        return v

    def encode_prompt(
        self, pipe, prompts: Sequence[str], *, max_sequence_length: int, device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 tokens ``[B, L, 4096]`` and pooled CLIP-L ``[B, 768]`` (the text ids are all zero
        and rebuilt at each call, so the cache stores no more than for SD3)."""
        embeds, pooled, _ = pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=device, max_sequence_length=max_sequence_length
        )
        return embeds, pooled
