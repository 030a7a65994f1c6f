"""What every model family supplies to the shared rollout, losses and evaluation.

The SDE/CPS step math (``flow.sde``), trajectories and rewards see only unpacked latents
``[B, C, h, w]`` and float32 velocities; each family hides behind one ``Backbone`` how its
transformer is called (timestep scale, guidance, token packing, position ids), how its text is
encoded, how its noise schedule is set and which pipeline class saves and loads its LoRA.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from apexcli.conditioning import PromptEmbeds
from apexcli.errors import ApexError

JOINT_ATTENTION_PROJECTIONS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)
"""The joint-attention projections of an MMDiT block, as diffusers names them in SD3's blocks and
FLUX's double-stream blocks alike (``lora.target_modules``' default). In FLUX the suffixes
``attn.to_q/k/v`` also match the single-stream blocks' attention, which has no ``to_out``
(``proj_out`` fuses it with the MLP)."""


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The underlying diffusers model behind DDP/FSDP (``.module``) or torch.compile (``._orig_mod``)."""
    while True:
        inner = getattr(model, "module", None)
        if isinstance(inner, torch.nn.Module):
            model = inner
            continue
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, torch.nn.Module):
            model = inner
            continue
        return model


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the frozen base weights (a float32 LoRA does not count). Cheaper than
    diffusers' ``model.dtype``, which walks every module and runs on each forward here."""
    params = unwrap_model(model).parameters()
    first = next(params)
    if not first.requires_grad:
        return first.dtype
    return next((p.dtype for p in params if not p.requires_grad), first.dtype)


def dynamic_shift_mu(scheduler, seq_len: int, max_shift: float) -> float:
    """The scheduler's time-shift ``mu`` for ``seq_len`` image tokens: linear between its base and
    max shift over 256..4096 tokens, as diffusers' ``calculate_shift``; ``max_shift`` is the
    default of the pipeline whose schedule this mirrors (its scheduler config may set its own)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    c = scheduler.config
    return calculate_shift(
        seq_len,
        c.get("base_image_seq_len", 256),
        c.get("max_image_seq_len", 4096),
        c.get("base_shift", 0.5),
        c.get("max_shift", max_shift),
    )


class Backbone(ABC):
    """One text-to-image flow model family (stateless: one shared instance per family)."""

    family: str
    """Short name used in messages: ``sd3``, ``flux``."""
    pipeline_class: str
    """diffusers pipeline class name, as ``model_index.json``'s ``_class_name`` spells it."""
    transformer_class: str
    """diffusers transformer class name the family's models are (or derive from)."""
    default_lora_targets: tuple[str, ...]
    """Module-name suffixes that get LoRA adapters by default."""
    takes_true_cfg: bool = False
    """Whether ``true_cfg_scale`` > 1 means something: a negative-prompt forward on top of a
    distilled guidance (FLUX). Where ``guidance_scale`` is CFG itself (SD3) it is refused."""

    def pipeline_type(self) -> type:
        """The diffusers pipeline class: it saves and reads the family's LoRA files."""
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    @abstractmethod
    def latent_channels(self, config) -> int:
        """Channels of the unpacked latent the rollout keeps, from the transformer's config."""

    @abstractmethod
    def patch_size(self, config) -> int:
        """Latent pixels per token side: image sides must be a multiple of it times the VAE factor."""

    @abstractmethod
    def sigmas(self, scheduler, num_steps: int, latent_hw: tuple[int, int], patch: int) -> torch.Tensor:
        """``[T+1]`` CPU float32 noise levels ending in 0, set up as the family's pipeline does."""

    @abstractmethod
    def velocity(
        self,
        transformer: torch.nn.Module,
        x: torch.Tensor,
        sigma: float | torch.Tensor,
        cond: PromptEmbeds,
        *,
        guidance_scale: float,
        uncond: PromptEmbeds | None,
        true_cfg_scale: float = 1.0,
    ) -> torch.Tensor:
        """Float32 velocity ``eps - x0`` ``[B, C, h, w]`` at the unpacked latent ``x``;
        ``true_cfg_scale`` > 1 is FLUX's true CFG against ``uncond`` (1 for SD3)."""

    def check_true_cfg(self, scale: float, key: str) -> None:
        """An ApexError when the setting ``key`` (= ``scale``) asks for a true CFG this family does
        not take (checked at set-up, once the family is known)."""
        if scale != 1.0 and not self.takes_true_cfg:
            guidance = key.replace("true_cfg_scale", "guidance_scale") if "true_cfg_scale" in key else "--guidance"
            raise ApexError(
                f"{key}={scale:g} is for FLUX only: {self.family.upper()}'s guidance_scale is already true CFG "
                f"(a negative-prompt forward each step); set {key}=1 and raise {guidance} instead"
            )

    @abstractmethod
    def encode_prompt(
        self, pipe, prompts: Sequence[str], *, max_sequence_length: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prompt_embeds [B, L, D], pooled [B, P])`` of ``prompts``, what the text cache stores."""
