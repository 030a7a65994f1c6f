"""Published architecture configs of the models apex trains and scores with (no weights).

One place for the numbers that the real-shape fixtures (``models/real_shape.py``), the memory
plan and the GPU benchmark build from. Where each value was read:

- SD3.5 transformers, VAE and scheduler: ``transformer/``, ``vae/`` and ``scheduler/`` config.json
  of ``stabilityai/stable-diffusion-3.5-medium`` and ``-large`` (gated repositories; the values
  agree with several public copies of those files). Dual attention (MMDiT-X) is Medium-only:
  the Large config has no ``dual_attention_layers`` and its checkpoint no ``attn2`` tensors.
- SD3's text encoders: ``text_encoder*/config.json`` of the same repositories (CLIP-L/14 text
  tower with projection, OpenCLIP bigG/14 text tower with projection, T5 v1.1 XXL encoder).
  The special-token ids are those of their tokenizers (CLIP: BOS 49406, EOS 49407; the
  CLIP-L config keeps the legacy ``eos_token_id: 2``, under which transformers pools at the
  largest token id, i.e. at EOS). T5 ``model_max_length`` 512, CLIP 77.
- FLUX.1: ``transformer/``, ``vae/`` and ``scheduler/`` config.json of ``black-forest-labs/FLUX.1-dev``
  and ``-schnell`` (schnell: no guidance embedding); its text encoders are SD3's CLIP-L (the plain
  text model, pooled output) and T5 v1.1 XXL.
- Reward towers: ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (PickScore_v1's architecture) and
  ``openai/clip-vit-large-patch14`` (the LAION aesthetic predictor's backbone); the aesthetic MLP
  from the published head file's shapes (``rewards/aes.py``).
"""

from __future__ import annotations

from types import MappingProxyType

SD35M_TRANSFORMER = MappingProxyType(
    dict(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        num_layers=24,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        out_channels=16,
        pos_embed_max_size=384,
        qk_norm="rms_norm",
        dual_attention_layers=tuple(range(13)),
    )
)
"""SD3.5 Medium MMDiT-X: 24 blocks of 24 x 64 = 1536, dual attention in blocks 0-12."""

SD35L_TRANSFORMER = MappingProxyType(
    dict(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        num_layers=38,
        attention_head_dim=64,
        num_attention_heads=38,
        joint_attention_dim=4096,
        caption_projection_dim=2432,
        pooled_projection_dim=2048,
        out_channels=16,
        pos_embed_max_size=192,
        qk_norm="rms_norm",
        dual_attention_layers=(),
    )
)
"""SD3.5 Large MMDiT: 38 blocks of 38 x 64 = 2432, no dual attention."""

SD3_VAE = MappingProxyType(
    dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        act_fn="silu",
        latent_channels=16,
        norm_num_groups=32,
        sample_size=1024,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
)
"""SD3 / SD3.5 VAE: 16 latent channels, downsampling 8, scaling 1.5305, shift 0.0609."""

FLUX1_DEV_TRANSFORMER = MappingProxyType(
    dict(
        patch_size=1,
        in_channels=64,
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )
)
"""FLUX.1-dev: 19 double-stream + 38 single-stream blocks of 24 x 128 = 3072 on 2x2-packed
16-channel latents, T5-XXL tokens, pooled CLIP-L, a guidance embedding (schnell: without)."""

FLUX1_SCHNELL_TRANSFORMER = MappingProxyType({**FLUX1_DEV_TRANSFORMER, "guidance_embeds": False})
"""FLUX.1-schnell (``transformer/config.json`` of ``black-forest-labs/FLUX.1-schnell``): FLUX.1-dev's
architecture without the guidance embedding (timestep-distilled, no guidance input)."""

FLUX_VAE = MappingProxyType({**SD3_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159})
"""FLUX.1's VAE: SD3's architecture with its own latent scaling 0.3611 and shift 0.1159."""

FLUX_SCHEDULER = MappingProxyType(
    dict(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
)
"""FLUX.1-dev's scheduler: the shift ``mu`` grows with the token count (``calculate_shift``)."""

SD3_SCHEDULER_SHIFT = 3.0
"""``FlowMatchEulerDiscreteScheduler`` shift of every SD3.5 release (static, no dynamic shifting)."""

CLIP_TOKENS = 77
T5_MODEL_MAX_LENGTH = 512
CLIP_BOS_ID, CLIP_EOS_ID, CLIP_VOCAB = 49406, 49407, 49408

CLIP_L_TEXT = MappingProxyType(
    dict(
        vocab_size=CLIP_VOCAB,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=CLIP_TOKENS,
        hidden_act="quick_gelu",
        projection_dim=768,
        layer_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
)
"""SD3's ``text_encoder``: CLIP ViT-L/14 text tower with projection (legacy EOS id 2: pools at argmax id)."""

CLIP_G_TEXT = MappingProxyType(
    dict(
        vocab_size=CLIP_VOCAB,
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        max_position_embeddings=CLIP_TOKENS,
        hidden_act="gelu",
        projection_dim=1280,
        layer_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
)
"""SD3's ``text_encoder_2``: OpenCLIP bigG/14 text tower with projection."""

T5_XXL = MappingProxyType(
    dict(
        vocab_size=32128,
        d_model=4096,
        d_ff=10240,
        d_kv=64,
        num_heads=64,
        num_layers=24,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        layer_norm_epsilon=1e-6,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tie_word_embeddings=False,
        is_encoder_decoder=False,
    )
)
"""SD3's ``text_encoder_3``: the T5 v1.1 XXL encoder (4.76 B parameters)."""

CLIP_H_TEXT = MappingProxyType(
    dict(
        vocab_size=CLIP_VOCAB,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        max_position_embeddings=CLIP_TOKENS,
        hidden_act="gelu",
    )
)
CLIP_H_VISION = MappingProxyType(
    dict(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        hidden_act="gelu",
    )
)
CLIP_H_PROJECTION = 1024
"""PickScore_v1 = CLIP ViT-H/14 (laion2B): text 24 x 1024, vision 32 x 1280, projection 1024."""

CLIP_L_VISION = MappingProxyType(
    dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        hidden_act="quick_gelu",
        projection_dim=768,
    )
)
"""The aesthetic predictor's backbone: the CLIP ViT-L/14 vision tower (768-d projection)."""

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

SD3_FAMILIES = MappingProxyType({"sd35m": SD35M_TRANSFORMER, "sd35l": SD35L_TRANSFORMER})
"""Transformer config of each SD3.5 release, by the preset family name."""

RELEASES = MappingProxyType(
    {
        "stabilityai/stable-diffusion-3.5-large": SD35L_TRANSFORMER,
        "stabilityai/stable-diffusion-3.5-medium": SD35M_TRANSFORMER,
        "black-forest-labs/FLUX.1-dev": FLUX1_DEV_TRANSFORMER,
        "black-forest-labs/FLUX.1-schnell": FLUX1_SCHNELL_TRANSFORMER,
    }
)
"""Transformer config of each published release, by its hub id."""
