"""Load an SD3 or FLUX pipeline from a hub id, a local directory, the packaged `mini` one, or build a tiny one in code."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from apexcli.backbones import backbone_for_class
from apexcli.config import ModelConfig
from apexcli.errors import ApexError
from apexcli.models.sources import MINI_DIR, looks_like_path

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` as a torch device; anything torch does not know,
    or a GPU that is not there, is an ApexError (set by --device or model.device)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ApexError(f"model.device (--device) '{name}' is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ApexError(f"model.device is '{name}' but no CUDA GPU is visible; use model.device=cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ApexError(
            f"model.device is '{name}' but only {torch.cuda.device_count()} CUDA GPU(s) are visible "
            f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})"
        )
    return device


ATTENTION_KERNELS = ("auto", "flash", "efficient", "cudnn", "math")


def attention_kernels(name: str):
    """Context that restricts PyTorch's scaled-dot-product attention to one kernel (``auto``:
    PyTorch picks per call). SD3's joint attention runs through SDPA, so this is its switch."""
    if name == "auto":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]
    return sdpa_kernel([backend])


def compile_transformer_blocks(transformer: torch.nn.Module, **compile_kwargs) -> int:
    """Regional compilation: compile each transformer block's ``forward`` in place.

    The blocks hold almost all of the FLOPs, identical blocks share one compiled graph (so the
    warm-up is a fraction of a whole-model compile), and hooks stay outside the compiled code:
    FSDP's gathers, DDP and gradient checkpointing keep working, and every caller of the model
    (rollout, training, the LoRA-disabled reference, the gradient probe, evaluation) runs the
    compiled blocks. Returns the number of blocks compiled.
    """
    blocks = getattr(transformer, "transformer_blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList) or len(blocks) == 0:
        raise ValueError(f"{type(transformer).__name__} has no transformer_blocks to compile")
    single = getattr(transformer, "single_transformer_blocks", None)  # FLUX's single-stream blocks
    if isinstance(single, torch.nn.ModuleList):
        blocks = [*blocks, *single]
    # One graph per (block structure x grad mode x LoRA on/off x input requires_grad): SD3.5-M
    # has three block structures, so an RL iteration needs about a dozen, over dynamo's default
    # limit of 8 per function (past it, calls silently fall back to eager).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for block in blocks:
        block.forward = torch.compile(block.forward, **compile_kwargs)
    return len(blocks)


def _pipeline_class_name(source: str, cfg: ModelConfig) -> str:
    """``_class_name`` of the pipeline's ``model_index.json`` (a local dir, or the hub's file)."""
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(source, revision=cfg.revision, local_files_only=cfg.local_files_only)
    return str(index.get("_class_name", "StableDiffusion3Pipeline"))


def load_pipeline(cfg: ModelConfig, dtype: torch.dtype | None = None):
    """The pipeline on CPU in the configured dtype; the caller moves modules where they belong.
    The family (SD3 or FLUX) is the one ``model_index.json`` names; any other is an ApexError."""
    dtype = dtype or DTYPES[cfg.dtype]
    if cfg.pretrained == "tiny":
        from apexcli.models.tiny import build_tiny_pipeline

        return build_tiny_pipeline(seed=cfg.tiny_seed, dtype=dtype)
    if cfg.pretrained == "tiny-flux":
        from apexcli.models.tiny_flux import build_tiny_flux_pipeline

        return build_tiny_flux_pipeline(seed=cfg.tiny_seed, dtype=dtype)
    source = cfg.pretrained
    if source == "mini":  # the pretrained miniature pipeline shipped inside the package
        source = str(MINI_DIR)
    if looks_like_path(source):
        path = Path(source).expanduser()
        if not (path / "model_index.json").is_file():
            raise ApexError(
                f"model.pretrained '{source}' is not a diffusers pipeline directory (no model_index.json); "
                "point it at a folder made by save_pretrained or `huggingface-cli download <id> --local-dir DIR`"
            )
        source = str(path)
    try:
        class_name = _pipeline_class_name(source, cfg)
        backbone = backbone_for_class(class_name, f"model.pretrained '{cfg.pretrained}'")
        return backbone.pipeline_type().from_pretrained(
            source,
            torch_dtype=dtype,
            revision=cfg.revision,
            variant=cfg.variant,
            local_files_only=cfg.local_files_only,
        )
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ApexError(
            f"could not load model '{cfg.pretrained}' ({first[:160]}); without hub access download it elsewhere with "
            f"`huggingface-cli download {cfg.pretrained} --local-dir DIR` and pass model.pretrained=DIR"
        ) from None
