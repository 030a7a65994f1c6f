"""A tiny FLUX.1-dev-architecture pipeline built entirely in code: random weights, the character
tokenizer of the tiny SD3 pipeline, no files and no network. Deterministic from the seed.

Same modules as FLUX.1-dev, only tiny: double- and single-stream blocks with rotary position ids
and a guidance embedding, a 16-channel VAE with FLUX's shift/scale, a CLIP-L-style text model
(pooled) and a T5 encoder (tokens), and a dynamically shifted flow-matching scheduler, so the
FLUX code paths (packing, dynamic shift, distilled guidance) run on a CPU in seconds.
``schnell=True`` builds the FLUX.1-schnell variant: no guidance embedding and schnell's
unshifted scheduler.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from apexcli.models.tiny import TINY_MAX_TOKENS, TINY_RESOLUTION, build_char_tokenizer

FLUX_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
"""FLUX.1-dev's ``scheduler/scheduler_config.json``: the shift depends on the token count."""

SCHNELL_SCHEDULER = {**FLUX_SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False}
"""FLUX.1-schnell's: no shift at all (its few steps take the plain ``linspace(1, 1/T, T)``)."""

FLUX_VAE_FACTORS = dict(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159)
"""FLUX.1's VAE latent: 16 channels, ``(z - 0.1159) * 0.3611`` has unit variance."""


def _text_encoders(vocab: int, hidden: int) -> tuple[CLIPTextModel, T5EncoderModel]:
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=TINY_MAX_TOKENS,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=vocab,
            d_model=hidden,
            d_kv=8,
            d_ff=2 * hidden,
            num_layers=2,
            num_heads=4,
            pad_token_id=0,
            eos_token_id=3,
            decoder_start_token_id=0,
        )
    )
    return clip, t5


def build_tiny_flux_pipeline(
    seed: int = 0, dtype: torch.dtype = torch.float32, *, schnell: bool = False
) -> FluxPipeline:
    """Build the tiny FLUX pipeline (FLUX.1-dev's layout; ``schnell``: FLUX.1-schnell's, without
    the guidance embedding, with its unshifted scheduler). Same seed -> bit-identical weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = build_char_tokenizer()
        clip, t5 = _text_encoders(len(tokenizer), 32)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * FLUX_VAE_FACTORS["latent_channels"],  # 2x2-packed latent tokens
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=32,  # = T5 width
            pooled_projection_dim=32,  # = CLIP width
            guidance_embeds=not schnell,  # FLUX.1-dev distils guidance into an input; schnell has none
            axes_dims_rope=(2, 2, 4),  # sums to the head width, as (16, 56, 56) does to 128
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 16),
            layers_per_block=1,
            norm_num_groups=1,
            sample_size=TINY_RESOLUTION,
            use_quant_conv=False,
            use_post_quant_conv=False,
            **FLUX_VAE_FACTORS,
        )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**(SCHNELL_SCHEDULER if schnell else FLUX_SCHEDULER)),
        vae=vae,
        text_encoder=clip,
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=tokenizer,
        transformer=transformer,
    )
    for module in (transformer, vae, clip, t5):
        module.eval()  # T5 and CLIP carry dropout; encodings must be deterministic
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
