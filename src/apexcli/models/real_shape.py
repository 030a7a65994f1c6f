"""Real-shape fixtures: the published SD3.5 and FLUX.1-dev architectures with only the depth cut, random weights.

Tiny models hide real bugs (a float32 ``linspace`` over a tensor of more than 2^24 elements, a
buffer a memory plan forgot, a text length that only exists at 128 T5 tokens). These pipelines
keep every width, head count, patch size, position-embedding size, qk-norm, dual-attention
layout, VAE (at full depth: it is small), scaling/shift factor, text-encoder width and
tokenizer length and special-token id of the published configs (``models/architectures.py``),
and cut only the depth: ``num_layers`` transformer blocks, ``text_layers`` layers per text
encoder. They are saved in diffusers' layout and loaded back through ``load_pipeline``, the
same ``from_pretrained`` path as the released weights.

The tokenizers are character-level stand-ins with the real lengths (CLIP 77, T5 512) and the
real special-token ids (CLIP BOS 49406 / EOS 49407 / "!" 0; T5 pad 0, EOS 1, unk 2); the BPE
merges themselves come with the released weights and are not needed to exercise the shapes.

    python -m apexcli.models.real_shape sd35m DIR     # then: apex train --preset sd35m-1gpu --model DIR
"""

from __future__ import annotations

import string
import sys
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

from apexcli.models import architectures as arch

_CHARS = string.printable[:95]  # digits, letters, punctuation, space


def clip_tokenizer(pad_token: str = "<|endoftext|>") -> PreTrainedTokenizerFast:
    """Character-level tokenizer with CLIP's length (77) and special-token ids. SD3's
    ``tokenizer`` pads with ``<|endoftext|>``, its ``tokenizer_2`` with ``!`` (id 0)."""
    vocab = {"!": 0}
    for ch in _CHARS:
        vocab.setdefault(ch, 256 + len(vocab))  # inside CLIP's 49408 rows, as real ids are
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = arch.CLIP_BOS_ID, arch.CLIP_EOS_ID
    used = set(vocab.values())  # the rows between are placeholders: a vocabulary with holes does not save cleanly
    vocab.update({f"<|unused{i}|>": i for i in range(arch.CLIP_VOCAB) if i not in used})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", arch.CLIP_BOS_ID), ("<|endoftext|>", arch.CLIP_EOS_ID)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token=pad_token,
        model_max_length=arch.CLIP_TOKENS,
    )


def t5_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer with T5's ids (pad 0, EOS 1, unk 2), EOS appended, length 512."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for ch in _CHARS:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=arch.T5_MODEL_MAX_LENGTH,
    )


def _cut(config, **depth) -> dict:
    return {**dict(config), **depth}


def real_shape_transformer_config(family: str, num_layers: int) -> dict:
    """The published transformer config of ``family`` cut to ``num_layers`` blocks; a cut sd35m
    keeps dual attention in block 0 only, so both block structures of MMDiT-X stay present."""
    if family not in arch.SD3_FAMILIES:
        raise ValueError(f"unknown SD3 family {family!r}; one of {sorted(arch.SD3_FAMILIES)}")
    published = arch.SD3_FAMILIES[family]
    config = _cut(published, num_layers=num_layers)
    if config["dual_attention_layers"] and num_layers < published["num_layers"]:
        config["dual_attention_layers"] = (0,)
    return config


def real_shape_flux_config(num_layers: int, num_single_layers: int) -> dict:
    """FLUX.1-dev's published transformer config with ``num_layers`` double-stream and
    ``num_single_layers`` single-stream blocks (the release: 19 and 38)."""
    return _cut(arch.FLUX1_DEV_TRANSFORMER, num_layers=num_layers, num_single_layers=num_single_layers)


def build_real_shape_sd3(
    family: str = "sd35m",
    *,
    num_layers: int = 2,
    text_layers: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
) -> StableDiffusion3Pipeline:
    """An SD3.5 pipeline (``family``: sd35m or sd35l) at its published widths, ``num_layers``
    transformer blocks (``real_shape_transformer_config``; the last one text-output-free, as in
    the release) and ``text_layers`` layers per text encoder. Random weights, initialised on ``device``
    (a GPU builds a full-depth model in seconds; the caller moves modules where they belong)."""
    transformer_config = real_shape_transformer_config(family, num_layers)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        clip_l = CLIPTextModelWithProjection(CLIPTextConfig(**_cut(arch.CLIP_L_TEXT, num_hidden_layers=text_layers)))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**_cut(arch.CLIP_G_TEXT, num_hidden_layers=text_layers)))
        t5 = T5EncoderModel(T5Config(**_cut(arch.T5_XXL, num_layers=text_layers)))
        transformer = SD3Transformer2DModel(**transformer_config)
        vae = AutoencoderKL(**dict(arch.SD3_VAE))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=arch.SD3_SCHEDULER_SHIFT),
        vae=vae,
        text_encoder=clip_l,
        tokenizer=clip_tokenizer(),
        text_encoder_2=clip_g,
        tokenizer_2=clip_tokenizer(pad_token="!"),
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer(),
    )
    for module in (transformer, vae, clip_l, clip_g, t5):
        module.eval()
    return pipe.to(dtype=dtype)


def build_real_shape_flux(
    *,
    num_layers: int = 1,
    num_single_layers: int = 1,
    text_layers: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
) -> FluxPipeline:
    """A FLUX.1-dev pipeline at its published widths (3072-wide blocks, 24 x 128 heads, rotary
    axes (16, 56, 56), 64 packed input channels, T5-XXL 4096 tokens, pooled CLIP-L 768, guidance
    embedding), ``num_layers`` double- and ``num_single_layers`` single-stream blocks and
    ``text_layers`` layers per text encoder. Random weights, initialised on ``device``."""
    config = real_shape_flux_config(num_layers, num_single_layers)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        # FLUX's CLIP-L is the plain text model (pooler output, no projection)
        clip_l = CLIPTextModel(CLIPTextConfig(**_cut(arch.CLIP_L_TEXT, num_hidden_layers=text_layers)))
        t5 = T5EncoderModel(T5Config(**_cut(arch.T5_XXL, num_layers=text_layers)))
        transformer = FluxTransformer2DModel(**config)
        vae = AutoencoderKL(**dict(arch.FLUX_VAE))
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**dict(arch.FLUX_SCHEDULER)),
        vae=vae,
        text_encoder=clip_l,
        tokenizer=clip_tokenizer(),
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer(),
        transformer=transformer,
    )
    for module in (transformer, vae, clip_l, t5):
        module.eval()
    return pipe.to(dtype=dtype)


def save_real_shape_sd3(path: str | Path, family: str = "sd35m", **kwargs) -> Path:
    """``build_real_shape_sd3`` saved in diffusers' layout (safetensors) to ``path``."""
    path = Path(path)
    build_real_shape_sd3(family, **kwargs).save_pretrained(path, safe_serialization=True)
    return path


def save_real_shape_flux(path: str | Path, **kwargs) -> Path:
    """``build_real_shape_flux`` saved in diffusers' layout (safetensors) to ``path``."""
    path = Path(path)
    build_real_shape_flux(**kwargs).save_pretrained(path, safe_serialization=True)
    return path


def _clip_processor() -> CLIPImageProcessor:
    size = arch.CLIP_H_VISION["image_size"]
    return CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(arch.CLIP_MEAN),
        image_std=list(arch.CLIP_STD),
        do_convert_rgb=True,
    )


def save_real_shape_pickscore(path: str | Path, *, layers: int = 1, seed: int = 0) -> Path:
    """PickScore_v1's CLIP-H/14 at its real widths (``layers`` per tower), processor and tokenizer,
    in one folder: ``rewards.pick.source`` and ``rewards.pick.processor_source`` both point here."""
    path = Path(path)
    config = CLIPConfig(
        text_config=_cut(arch.CLIP_H_TEXT, num_hidden_layers=layers, bos_token_id=0, eos_token_id=2, pad_token_id=1),
        vision_config=_cut(arch.CLIP_H_VISION, num_hidden_layers=layers),
        projection_dim=arch.CLIP_H_PROJECTION,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.save_pretrained(path, safe_serialization=True)
    _clip_processor().save_pretrained(path)
    clip_tokenizer(pad_token="!").save_pretrained(path)
    return path


def save_real_shape_aesthetic(path: str | Path, *, layers: int = 1, seed: int = 0) -> tuple[Path, Path]:
    """The aesthetic reward's CLIP-L/14 vision tower at real width (``layers`` deep) in
    ``path/clip`` and a LAION-shaped MLP head (768-1024-128-64-16-1) in ``path/head.safetensors``."""
    from safetensors.torch import save_file

    from apexcli.rewards.aes import AestheticHead

    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**_cut(arch.CLIP_L_VISION, num_hidden_layers=layers)))
        head = AestheticHead()
    clip.save_pretrained(path / "clip", safe_serialization=True)
    _clip_processor().save_pretrained(path / "clip")
    head_file = path / "head.safetensors"
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(head_file))
    return path / "clip", head_file


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        description="Save a real-shape SD3.5 or FLUX.1-dev pipeline (random weights, depth cut)."
    )
    parser.add_argument("family", choices=[*sorted(arch.SD3_FAMILIES), "flux1-dev"])
    parser.add_argument("out", type=Path)
    parser.add_argument(
        "--layers", type=int, default=2, help="transformer blocks (the release has 24 / 38; FLUX: double-stream, 19)"
    )
    parser.add_argument("--text-layers", type=int, default=1, help="layers per text encoder")
    args = parser.parse_args(argv)
    if args.family == "flux1-dev":
        save_real_shape_flux(
            args.out, num_layers=args.layers, num_single_layers=args.layers, text_layers=args.text_layers
        )
    else:
        save_real_shape_sd3(args.out, args.family, num_layers=args.layers, text_layers=args.text_layers)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
