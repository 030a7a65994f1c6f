"""What the memory plan (``models/memory_plan.py``) needs from each model family, one class per family.

The plan's accounting is family-independent; only these differ between SD3.5 and FLUX.1:

- which diffusers class a transformer config builds, and which of its modules are the blocks;
- how many transformer forwards one velocity takes (SD3's CFG batches ``[uncond, cond]``; FLUX.1-dev
  takes its distilled guidance as an input of ONE forward, and true CFG, when asked, doubles it);
- the text tokens a prompt becomes (SD3: 77 CLIP + the T5 length; FLUX: the T5 length);
- the VAE and text encoders loaded beside the transformer, and what loading costs the host.

The family of a transformer config is read through ``apexcli.backbones``: the config's
``_class_name`` when it has one, else the family whose transformer class takes every key of it.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from types import SimpleNamespace

import torch

from apexcli.backbones import Backbone
from apexcli.backbones.flux import FluxBackbone
from apexcli.backbones.sd3 import SD3Backbone
from apexcli.conditioning import PromptEmbeds
from apexcli.errors import ApexError
from apexcli.models import architectures as arch

POS_EMBED_BUILD_BYTES_PER_VALUE = 16.09
"""Peak host RSS of building an SD3 ``PatchEmbed``, per value of its ``pos_embed`` table: diffusers
computes the sincos table in float64 (two [grid^2, dim] copies at once) before casting it.
Measured by ``benchmarks/memory_measure.py`` (16.09 for SD3.5-M's 384 x 384 x 1536 table); every
``from_pretrained`` of the transformer pays it, whatever the weights."""


def _meta_text_models(kinds: dict[str, tuple[str, dict]]) -> dict[str, int]:
    """Parameters of transformers text models built on meta: ``{key: (class name, config)}``."""
    import transformers

    counts = {}
    with torch.device("meta"):
        for key, (cls_name, config) in kinds.items():
            cls = getattr(transformers, cls_name)
            model = cls(cls.config_class(**dict(config)))
            counts[key] = sum(p.numel() for p in model.parameters())
    return counts


class FamilyPlan(ABC):
    """The family-specific parts of a memory plan (stateless: one shared instance per family)."""

    backbone: Backbone
    patch: int
    """Latent pixels per token side (every published release of both families packs 2 x 2)."""
    encoders_label: str
    """The plan's label of the text encoders together."""
    buffers_row: tuple[str, str]
    """Key and label of the plan's row of the transformer's buffers (a row only when it has some)."""

    @property
    def name(self) -> str:
        return self.backbone.family

    def transformer_type(self) -> type:
        """The diffusers transformer class of the family."""
        import diffusers

        return getattr(diffusers, self.backbone.transformer_class)

    def takes(self, config: dict) -> bool:
        """Whether the family's transformer class takes every key of ``config`` (``_`` keys aside)."""
        params = inspect.signature(self.transformer_type().__init__).parameters
        return all(k in params for k in config if not k.startswith("_"))

    def latent_channels(self, config: dict) -> int:
        """Channels of the unpacked latent the rollout keeps (the backbone's reading of ``config``)."""
        return self.backbone.latent_channels(SimpleNamespace(**config))

    @abstractmethod
    def blocks(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The transformer blocks, in the order a forward runs them (checkpointing recomputes these)."""

    @abstractmethod
    def forward_passes(self, guidance_scale: float, true_cfg_scale: float) -> int:
        """Transformer forwards per velocity, batched into one call: 2 with classifier-free guidance."""

    @abstractmethod
    def text_tokens(self, max_sequence_length: int) -> int:
        """Tokens of one prompt's ``encoder_hidden_states``."""

    @abstractmethod
    def velocity(
        self,
        model: torch.nn.Module,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: PromptEmbeds,
        *,
        uncond: PromptEmbeds,
        guidance_scale: float,
        true_cfg_scale: float,
    ) -> torch.Tensor:
        """The velocity the trainer and the rollout compute, with the forwards ``forward_passes`` counts."""

    @abstractmethod
    def vae_config(self) -> dict:
        """The published VAE config."""

    @abstractmethod
    def text_encoders(self) -> dict[str, tuple[str, dict]]:
        """The text encoders: ``{key: (transformers class name, published config)}``."""

    def component_params(self) -> dict[str, int]:
        """Parameters of the VAE (``vae``) and of each text encoder, built on meta."""
        from diffusers import AutoencoderKL

        with torch.device("meta"):
            vae = AutoencoderKL.from_config(self.vae_config())
        return {"vae": sum(p.numel() for p in vae.parameters()), **_meta_text_models(self.text_encoders())}

    def host_transient(self, model: torch.nn.Module) -> list[tuple[str, str, int, str]]:
        """Host RAM that building the transformer takes on top of its weights: ``(key, label, bytes,
        detail)`` rows. None by default."""
        return []


class SD3Plan(FamilyPlan):
    """SD3 / SD3.5 (MMDiT): CFG batches ``[uncond, cond]``, CLIP-L + CLIP-G + T5 text, a sincos ``pos_embed``."""

    backbone = SD3Backbone()
    patch = arch.SD35M_TRANSFORMER["patch_size"]
    encoders_label = "CLIP-L + CLIP-G + T5-XXL text encoders"
    buffers_row = ("pos_embed", "transformer buffers (PatchEmbed pos_embed)")

    def blocks(self, model):
        return list(model.transformer_blocks)

    def forward_passes(self, guidance_scale, true_cfg_scale):
        return 2 if guidance_scale > 1 else 1

    def text_tokens(self, max_sequence_length):
        return arch.CLIP_TOKENS + max_sequence_length

    def velocity(self, model, x, sigma, cond, *, uncond, guidance_scale, true_cfg_scale):
        from apexcli.flow.rollout import predict_velocity

        return predict_velocity(model, x, sigma, cond, guidance_scale=guidance_scale, uncond=uncond)

    def vae_config(self):
        return dict(arch.SD3_VAE)

    def text_encoders(self):
        return {
            "clip_l_text": ("CLIPTextModelWithProjection", arch.CLIP_L_TEXT),
            "clip_g_text": ("CLIPTextModelWithProjection", arch.CLIP_G_TEXT),
            "t5_xxl_encoder": ("T5EncoderModel", arch.T5_XXL),
        }

    def host_transient(self, model):
        values = model.pos_embed.pos_embed.numel()
        return [
            (
                "host_pos_embed_build",
                "host: building the transformer's pos_embed (float64, transient)",
                int(POS_EMBED_BUILD_BYTES_PER_VALUE * values),
                f"{POS_EMBED_BUILD_BYTES_PER_VALUE} bytes x {values:,} values",
            )
        ]


class FluxPlan(FamilyPlan):
    """FLUX.1 (dev, schnell): 2x2-packed latent tokens, double- then single-stream blocks, the
    distilled guidance an input of one forward, T5 tokens + pooled CLIP-L, rotary ids (no table)."""

    backbone = FluxBackbone()
    patch = 2
    encoders_label = "CLIP-L + T5-XXL text encoders"
    buffers_row = ("transformer_buffers", "transformer buffers")

    def blocks(self, model):
        return [*model.transformer_blocks, *model.single_transformer_blocks]

    def forward_passes(self, guidance_scale, true_cfg_scale):
        return 2 if true_cfg_scale > 1 else 1

    def text_tokens(self, max_sequence_length):
        return max_sequence_length

    def velocity(self, model, x, sigma, cond, *, uncond, guidance_scale, true_cfg_scale):
        """One conditional forward; with true CFG (``true_cfg_scale > 1``) the unconditional and
        conditional forwards run as one batch ``[uncond, cond]`` and combine in float32: the
        memory of the two forwards whose graphs the backward needs at once."""
        from apexcli.flow.rollout import predict_velocity

        if true_cfg_scale <= 1:
            return predict_velocity(model, x, sigma, cond, guidance_scale=guidance_scale)
        n = x.shape[0]
        both = PromptEmbeds.cat([uncond.expand(n), cond.expand(n)])
        sigmas = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(n)
        v_u, v_c = predict_velocity(
            model, torch.cat([x, x]), torch.cat([sigmas, sigmas]), both, guidance_scale=guidance_scale
        ).chunk(2)
        return v_u + true_cfg_scale * (v_c - v_u)

    def vae_config(self):
        return dict(arch.FLUX_VAE)

    def text_encoders(self):
        # FLUX's CLIP-L is the plain text model: its pooled output, no projection
        return {"clip_l_text": ("CLIPTextModel", arch.CLIP_L_TEXT), "t5_xxl_encoder": ("T5EncoderModel", arch.T5_XXL)}


FAMILY_PLANS: dict[str, FamilyPlan] = {p.name: p for p in (SD3Plan(), FluxPlan())}
"""Every family of ``apexcli.backbones.BACKBONES``, by its name."""


def family_plan(family: str | Backbone) -> FamilyPlan:
    """The plan parts of a family (its ``Backbone`` or its name)."""
    return FAMILY_PLANS[family if isinstance(family, str) else family.family]


def family_of_model(model: torch.nn.Module) -> FamilyPlan:
    """The plan parts of a built transformer, by its backbone."""
    from apexcli.backbones import backbone_of

    return family_plan(backbone_of(model))


def family_of_config(config: dict) -> FamilyPlan:
    """The family of a transformer config: its ``_class_name`` (a saved ``config.json``), else the
    one family whose transformer class takes every key; an ApexError when none does."""
    class_name = config.get("_class_name")
    if class_name is not None:
        found = [p for p in FAMILY_PLANS.values() if p.backbone.transformer_class == class_name]
        if not found:
            known = ", ".join(p.backbone.transformer_class for p in FAMILY_PLANS.values())
            raise ApexError(f"no memory plan for a {class_name} transformer; apex trains only {known}")
        return found[0]
    found = [p for p in FAMILY_PLANS.values() if p.takes(config)]
    if not found:
        keys = ", ".join(sorted(k for k in config if not k.startswith("_")))
        raise ApexError(f"no model family takes a transformer config with the keys {keys}; give an SD3 or FLUX config")
    return found[0]
