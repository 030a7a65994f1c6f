"""A tiny SD3-architecture pipeline built entirely in code: random weights, a character-level
tokenizer, no files and no network. Deterministic from the seed.

It has the same modules as SD3.5 (MMDiT with joint attention and a dual-attention layer,
16->4-channel VAE with shift/scale, two CLIP text encoders with projection, a T5 encoder), only
tiny, so the whole training loop runs on a CPU in seconds and tests exercise the real code paths.
"""

from __future__ import annotations

import string

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

TINY_MAX_TOKENS = 32
TINY_RESOLUTION = 64  # pixels; the VAE downsamples by 2, the transformer patchifies by 2
_SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]


def build_char_tokenizer(max_length: int = TINY_MAX_TOKENS) -> PreTrainedTokenizerFast:
    """One token per printable ASCII character, wrapped in <bos> ... <eos>."""
    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    for ch in string.printable[:95]:  # digits, letters, punctuation, space
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        model_max_length=max_length,
    )


def assemble_sd3_pipeline(transformer, vae, clip_l, clip_g, t5, tokenizer, shift: float) -> StableDiffusion3Pipeline:
    """An SD3 pipeline from its modules, one character tokenizer serving all three encoders."""
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=vae,
        text_encoder=clip_l,
        tokenizer=tokenizer,
        text_encoder_2=clip_g,
        tokenizer_2=tokenizer,
        text_encoder_3=t5,
        tokenizer_3=tokenizer,
    )


def _clip_text_encoder(vocab_size: int, hidden: int) -> CLIPTextModelWithProjection:
    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=hidden,
        max_position_embeddings=TINY_MAX_TOKENS,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    return CLIPTextModelWithProjection(cfg)


def build_tiny_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> StableDiffusion3Pipeline:
    """Build the tiny SD3 pipeline. Same seed -> bit-identical weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = build_char_tokenizer()
        vocab = len(tokenizer)
        clip_l = _clip_text_encoder(vocab, 32)
        clip_g = _clip_text_encoder(vocab, 32)
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=vocab,
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                pad_token_id=0,
                eos_token_id=3,
                decoder_start_token_id=0,
            )
        )
        transformer = SD3Transformer2DModel(
            sample_size=TINY_RESOLUTION // 2,
            patch_size=2,
            in_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=32,  # = T5 / CLIP hidden size
            caption_projection_dim=32,
            pooled_projection_dim=64,  # = CLIP-L + CLIP-G projections
            out_channels=4,
            pos_embed_max_size=TINY_RESOLUTION // 4,
            qk_norm="rms_norm",
            dual_attention_layers=(0,),  # as SD3.5
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=1,  # one group: per-channel latent shifts reach the image (brightness, colour)
            sample_size=TINY_RESOLUTION,
            shift_factor=0.0609,
            scaling_factor=1.5305,  # as SD3
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    pipe = assemble_sd3_pipeline(transformer, vae, clip_l, clip_g, t5, tokenizer, shift=3.0)
    for module in (transformer, vae, clip_l, clip_g, t5):
        module.eval()  # T5 and CLIP carry dropout; encodings must be deterministic
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
