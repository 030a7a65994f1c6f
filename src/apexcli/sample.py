"""``apex sample``: images from the base model plus an optional LoRA, with metadata.jsonl.

Each image's initial noise comes from its own seed, so an image is reproducible from
(prompt, seed, steps, guidance, size, LoRA) whatever the batch size. Sampling is the
deterministic ODE (Euler) sampler of evaluation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image

from apexcli.config import ModelConfig
from apexcli.errors import ApexError
from apexcli.flow.rollout import decode_latents, rollout
from apexcli.models.loading import load_pipeline, resolve_device
from apexcli.models.lora import load_lora_for_inference, resolve_lora_path
from apexcli.models.text_cache import encode_prompts
from apexcli.runs import LORA_FILE, atomic_write_text


@dataclass
class SampleRequest:
    model: ModelConfig
    """Which base model to load (hub id, local dir or tiny)."""
    prompts: list[str]
    """Prompts; each gets ``num_images`` images."""
    out: Path
    """Output folder for PNGs and metadata.jsonl."""
    lora: str | None = None
    """Checkpoint dir, run dir (its latest checkpoint) or .safetensors file; None = base model."""
    num_images: int = 1
    """Images per prompt."""
    seed: int = 0
    """Seed of the first image; image i uses seed + i."""
    steps: int = 40
    """ODE steps."""
    guidance_scale: float = 4.5
    """Classifier-free guidance (<= 1 disables it)."""
    height: int = 512
    """Image height in pixels."""
    width: int = 512
    """Image width in pixels."""
    batch_size: int = 4
    """Images per forward."""
    negative_prompt: str = ""
    """Unconditional prompt of CFG."""


def _to_pil(image: torch.Tensor) -> Image.Image:
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


@torch.no_grad()
def sample_images(req: SampleRequest) -> list[Path]:
    """Write the images and ``metadata.jsonl`` (file, prompt, seed, steps, guidance, lora)."""
    if not req.prompts:
        raise ApexError("no prompts: pass --prompt TEXT or --prompts FILE")
    for flag, value in (("--num-images", req.num_images), ("--batch-size", req.batch_size), ("--steps", req.steps), ("--size", min(req.height, req.width))):
        if value < 1:
            raise ApexError(f"{flag} must be >= 1, got {value}")
    if req.out.exists() and not req.out.is_dir():
        raise ApexError(f"--out '{req.out}' is a file; give a folder for the images and metadata.jsonl")
    if not (math.isfinite(req.guidance_scale) and req.guidance_scale >= 0):
        raise ApexError(f"--guidance must be a finite number >= 0, got {req.guidance_scale}")
    device = resolve_device(req.model.device)
    pipe = load_pipeline(req.model)
    lora_dir = None
    if req.lora:
        lora_dir = resolve_lora_path(req.lora)
        # name the file: given only a folder, diffusers guesses among its .safetensors files
        given = Path(req.lora)
        weight_file = given if given.is_file() else lora_dir / LORA_FILE
        load_lora_for_inference(pipe, weight_file)  # refuses a LoRA of another model: metadata records only what applied
        if given.is_file():
            lora_dir = given  # metadata names the exact file
    pipe.to(device)
    jobs = [(p, req.seed + i) for p in req.prompts for i in range(req.num_images)]
    seq = req.model.max_sequence_length
    uncond = encode_prompts(pipe, [req.negative_prompt], max_sequence_length=seq, device=device)
    req.out.mkdir(parents=True, exist_ok=True)
    channels = pipe.transformer.config.in_channels
    f = pipe.vae_scale_factor
    written, rows = [], []
    for start in range(0, len(jobs), req.batch_size):
        chunk = jobs[start : start + req.batch_size]
        cond = encode_prompts(pipe, [p for p, _ in chunk], max_sequence_length=seq, device=device)
        noise = torch.stack(
            [torch.randn((channels, req.height // f, req.width // f), generator=torch.Generator().manual_seed(s)) for _, s in chunk]
        ).to(device)
        traj = rollout(
            pipe.transformer, pipe.scheduler, cond,
            num_steps=req.steps, height=req.height, width=req.width, vae_scale_factor=f,
            guidance_scale=req.guidance_scale, uncond=uncond, sampler="ode", initial_noise=noise,
        )
        images = decode_latents(pipe.vae, traj.final)
        for j, (prompt, seed) in enumerate(chunk):
            name = f"{start + j:05d}-seed{seed}.png"
            _to_pil(images[j]).save(req.out / name)
            written.append(req.out / name)
            rows.append(
                {"file": name, "prompt": prompt, "seed": seed, "steps": req.steps, "guidance": req.guidance_scale,
                 "height": req.height, "width": req.width, "lora": str(lora_dir) if lora_dir else None}
            )
    atomic_write_text(req.out / "metadata.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return written


def sample_from_options(
    *, prompts: list[str], prompts_file: Path | None, out: Path, lora: str | None, preset: str | None,
    config_file: Path | None, model: str | None, num_images: int, seed: int, steps: int | None,
    guidance: float | None, size: int | None, batch_size: int, device: str | None, overrides: Sequence[str] = (),
) -> list[Path]:
    """Fill a SampleRequest from CLI options, ``key=value`` overrides and the preset/config
    defaults, then sample. The explicit options win over the overrides: they name one thing."""
    from apexcli.config import resolve_config, validate
    from apexcli.prompts import load_prompts

    cfg = resolve_config(preset=preset, config_file=config_file, overrides=list(overrides))
    explicit = {key: value for key, value in (("pretrained", model), ("device", device)) if value is not None}
    if explicit:
        cfg = replace(cfg, model=replace(cfg.model, **explicit))
        validate(cfg)
    all_prompts = list(prompts) + (load_prompts(str(prompts_file)) if prompts_file else [])
    return sample_images(
        SampleRequest(
            model=cfg.model, prompts=all_prompts, out=out, lora=lora, num_images=num_images, seed=seed,
            steps=cfg.eval.num_steps if steps is None else steps,
            guidance_scale=cfg.eval.guidance_scale if guidance is None else guidance,
            height=cfg.model.resolution if size is None else size, width=cfg.model.resolution if size is None else size,
            batch_size=batch_size,
            negative_prompt=cfg.sampling.negative_prompt,
        )
    )
