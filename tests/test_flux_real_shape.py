"""The real-shape FLUX.1-dev fixture (published widths, 1 double + 1 single block) through
``load_pipeline``, the text cache's encoding and the backbone's velocity call.

Minutes on two cores: marked slow (``make test-all``)."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline

from apexcli.config import ModelConfig
from apexcli.flow.rollout import latent_channels, predict_velocity
from apexcli.models.loading import load_pipeline
from apexcli.models.real_shape import build_real_shape_flux
from apexcli.models.text_cache import encode_prompts

pytestmark = pytest.mark.slow


def test_real_shape_flux_loads_encodes_and_predicts(tmp_path):
    build_real_shape_flux().save_pretrained(tmp_path / "flux", safe_serialization=True)
    pipe = load_pipeline(ModelConfig(pretrained=str(tmp_path / "flux"), dtype="bfloat16", local_files_only=True))
    assert isinstance(pipe, FluxPipeline) and pipe.vae_scale_factor == 8
    assert pipe.transformer.config.guidance_embeds and latent_channels(pipe.transformer) == 16
    cond = encode_prompts(pipe, ["a red apple"], max_sequence_length=128, device="cpu")
    assert cond.prompt_embeds.shape == (1, 128, 4096) and cond.pooled.shape == (1, 768)
    x = torch.randn(1, 16, 32, 32)  # 256 px: 256 packed tokens
    v = predict_velocity(pipe.transformer, x, 0.5, cond, guidance_scale=3.5)
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
