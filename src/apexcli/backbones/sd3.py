"""Stable Diffusion 3 / 3.5: MMDiT called with ``timestep = 1000 * sigma`` and true CFG.

Mirrors diffusers' ``StableDiffusion3Pipeline.__call__``: sigmas from
``scheduler.set_timesteps(num_steps)`` (with dynamic shifting, the ``mu`` the pipeline computes
from the token count), ``encoder_hidden_states`` + ``pooled_projections``, and classifier-free
guidance batched ``[uncond, cond]`` in one forward, combined in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from apexcli.backbones.base import JOINT_ATTENTION_PROJECTIONS, Backbone, dynamic_shift_mu, model_dtype

TIMESTEP_SCALE = 1000.0
"""SD3 transformers take ``timestep = 1000 * sigma``."""


def _timesteps(sigma: float | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """``[batch]`` float32 ``1000 * sigma``; float32 first so scalar and per-sample sigmas agree bitwise."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=device).reshape(-1)
    return (s * TIMESTEP_SCALE).expand(batch)


def scheduler_sigmas(scheduler, num_steps: int, latent_hw: tuple[int, int], patch_size: int) -> torch.Tensor:
    """``[T+1]`` CPU float32 sigmas, set up as ``StableDiffusion3Pipeline`` does."""
    kwargs = {}
    if scheduler.config.get("use_dynamic_shifting", False):
        seq_len = (latent_hw[0] // patch_size) * (latent_hw[1] // patch_size)
        kwargs["mu"] = dynamic_shift_mu(scheduler, seq_len, max_shift=1.16)
    scheduler.set_timesteps(num_steps, device="cpu", **kwargs)
    return scheduler.sigmas.detach().to("cpu", torch.float32).clone()


class SD3Backbone(Backbone):
    family = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    transformer_class = "SD3Transformer2DModel"
    default_lora_targets = JOINT_ATTENTION_PROJECTIONS

    def latent_channels(self, config) -> int:
        return int(config.in_channels)

    def patch_size(self, config) -> int:
        return int(config.patch_size)

    def sigmas(self, scheduler, num_steps: int, latent_hw: tuple[int, int], patch: int) -> torch.Tensor:
        return scheduler_sigmas(scheduler, num_steps, latent_hw, patch)

    def velocity(
        self, transformer, x, sigma, cond, *, guidance_scale=1.0, uncond=None, true_cfg_scale=1.0
    ) -> torch.Tensor:
        """``guidance_scale > 1``: classifier-free guidance ``v = v_u + g * (v_c - v_u)`` from ONE
        forward over the batch ``[uncond, cond]`` (``uncond`` may have batch 1, it is broadcast).
        ``guidance_scale <= 1``: one conditional forward, no unconditional pass. ``true_cfg_scale``
        must be 1: ``guidance_scale`` is SD3's true CFG."""
        if true_cfg_scale != 1.0:
            raise ValueError(f"SD3 takes no true_cfg_scale (got {true_cfg_scale}); its guidance_scale is true CFG")
        batch = x.shape[0]
        dtype = model_dtype(transformer)
        cond = cond.expand(batch)
        t = _timesteps(sigma, batch, x.device)
        if guidance_scale > 1.0:
            if uncond is None:
                raise ValueError("guidance_scale > 1 needs the unconditional (empty-prompt) embeddings")
            uncond = uncond.expand(batch)
            hidden = torch.cat([x, x])
            text = torch.cat([uncond.prompt_embeds, cond.prompt_embeds])
            pooled = torch.cat([uncond.pooled, cond.pooled])
            t = torch.cat([t, t])
        else:
            hidden, text, pooled = x, cond.prompt_embeds, cond.pooled
        out = transformer(
            hidden_states=hidden.to(dtype),
            timestep=t,
            encoder_hidden_states=text.to(device=x.device, dtype=dtype),
            pooled_projections=pooled.to(device=x.device, dtype=dtype),
            return_dict=False,
        )[0].float()
        if guidance_scale > 1.0:
            v_uncond, v_cond = out.chunk(2)
            return v_uncond + guidance_scale * (v_cond - v_uncond)
        return out

    def encode_prompt(
        self, pipe, prompts: Sequence[str], *, max_sequence_length: int, device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP-L + CLIP-G + T5 joint tokens ``[B, L, 4096]`` and pooled CLIP ``[B, 2048]``, no CFG pair."""
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
        return embeds, pooled
