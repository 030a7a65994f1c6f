"""LAION improved aesthetic predictor (github.com/christophschuhmann/improved-aesthetic-predictor).

    aes(image) = MLP( e / ||e|| ),   e = CLIP ViT-L/14 image embedding (768-d projection)

MLP: Linear(768,1024) Dropout(0.2) Linear(1024,128) Dropout(0.2) Linear(128,64) Dropout(0.1)
Linear(64,16) Linear(16,1), no activations (state dict keys layers.0/2/4/6/7.{weight,bias}).
Scores are on the AVA 1–10 scale, ≈ 5–6.5 for typical generations.

The head file `sac+logos+ava1-l14-linearMSE.pth` is published in that GitHub repo (and mirrored
on the hub, e.g. camenduru/improved-aesthetic-predictor). It is a plain state dict, so it is
read with torch.load(weights_only=True); a .safetensors copy works too.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, CLIPImageProcessor, CLIPVisionModelWithProjection

from apexcli.errors import ApexError
from apexcli.rewards.base import ImageBatch, Reward, resolve_dtype
from apexcli.rewards.clip_preprocess import ClipPreprocess, batch_pixels
from apexcli.rewards.config import AesConfig
from apexcli.rewards.hub import dtype_kwargs, load_pretrained, missing_weights_message

HEAD_LINEAR_KEYS = ("layers.0", "layers.2", "layers.4", "layers.6", "layers.7")
LAION_DIMS = (768, 1024, 128, 64, 16, 1)


class AestheticHead(nn.Module):
    """The LAION MLP; `dims` = (in, 1024, 128, 64, 16, 1) for the public file."""

    def __init__(self, dims: tuple[int, ...] = LAION_DIMS):
        super().__init__()
        d = dims
        self.layers = nn.Sequential(
            nn.Linear(d[0], d[1]),
            nn.Dropout(0.2),
            nn.Linear(d[1], d[2]),
            nn.Dropout(0.2),
            nn.Linear(d[2], d[3]),
            nn.Dropout(0.1),
            nn.Linear(d[3], d[4]),
            nn.Linear(d[4], d[5]),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(embedding)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> AestheticHead:
        """Build with the dims the state dict implies and load it strictly."""
        expected = {f"{k}.{p}" for k in HEAD_LINEAR_KEYS for p in ("weight", "bias")}
        if not isinstance(state, dict) or set(state) != expected:
            got = sorted(state)[:6] if isinstance(state, dict) else type(state).__name__
            raise ApexError(f"aesthetic head: expected keys layers.0/2/4/6/7.weight/bias, got {got}")
        dims = (state["layers.0.weight"].shape[1],) + tuple(state[f"{k}.weight"].shape[0] for k in HEAD_LINEAR_KEYS)
        head = cls(dims)
        head.load_state_dict(state)
        return head


def resolve_head_file(config: AesConfig) -> str:
    """Local file for the head: a file path, a dir + filename, or a hub download (cache/offline aware)."""
    src = config.head_source
    if os.path.isfile(src):
        return src
    if os.path.isdir(src):
        path = os.path.join(src, config.head_filename)
        if not os.path.isfile(path):
            raise ApexError(
                f"aesthetic head: {path!r} not found; set rewards.aes.head_source=/path/to/{config.head_filename}"
            )
        return path
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id=src, filename=config.head_filename)
    except Exception as exc:  # offline, 404, invalid repo id: all mean "not available here"
        raise ApexError(
            missing_weights_message("aesthetic MLP", src, "rewards.aes.head_source", type(exc).__name__)
        ) from None


def load_head_state(path: str) -> dict[str, torch.Tensor]:
    """Read the head weights safely (safetensors, or torch.load with weights_only=True)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle with code, corrupt file
        raise ApexError(
            f"aesthetic head {path!r} is not a plain tensor state dict ({type(exc).__name__}); "
            "use the original sac+logos+ava1-l14-linearMSE.pth or a .safetensors copy"
        ) from None


class Aesthetic(Reward):
    name = "aes"

    def __init__(self, config: AesConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.dtype = resolve_dtype(config.dtype, dtype)
        self.batch_size = config.batch_size
        what, option = "CLIP ViT-L/14 (aesthetic)", "rewards.aes.clip_source"
        full = load_pretrained(AutoConfig.from_pretrained, config.clip_source, what=what, option=option)
        vision = getattr(full, "vision_config", full)
        if hasattr(full, "projection_dim"):  # a full CLIP checkpoint keeps projection_dim at the top level
            vision.projection_dim = full.projection_dim
        self.clip = load_pretrained(
            CLIPVisionModelWithProjection.from_pretrained,
            config.clip_source,
            what=what,
            option=option,
            config=vision,
            **dtype_kwargs(self.dtype),
        )
        self.clip.to(self.device).eval().requires_grad_(False)
        proc = load_pretrained(
            CLIPImageProcessor.from_pretrained,
            config.clip_source,
            what="CLIP ViT-L/14 image processor",
            option="rewards.aes.clip_source",
        )
        self.preprocess = ClipPreprocess.from_processor(proc)
        self.head = AestheticHead.from_state_dict(load_head_state(resolve_head_file(config)))
        self.head.to(self.device).eval().requires_grad_(False)  # float32: it is tiny
        dim = self.clip.config.projection_dim
        if self.head.layers[0].in_features != dim:
            raise ApexError(
                f"aesthetic head expects {self.head.layers[0].in_features}-d embeddings but "
                f"{config.clip_source} gives {dim}-d; use CLIP ViT-L/14 (rewards.aes.clip_source)"
            )

    @torch.inference_mode()
    def embeddings(self, batch: ImageBatch) -> torch.Tensor:
        """L2-normalised image embeddings [B, D] (float32)."""
        pixels = batch_pixels(self.preprocess, batch, self.device, self.dtype)
        return F.normalize(self.clip(pixel_values=pixels).image_embeds.float(), dim=-1)

    @torch.inference_mode()
    def score(self, batch: ImageBatch, prompts: list[str]) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.head(self.embeddings(batch)).squeeze(-1).cpu(), {}
