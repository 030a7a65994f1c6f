"""``apex sample``: images from the base model plus an optional LoRA, with metadata.jsonl.

Each image's initial noise comes from its own seed, so an image is reproducible from
(prompt, seed, steps, guidance, true CFG, size, LoRA) whatever the batch size. Sampling is the
deterministic ODE (Euler) sampler of evaluation.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image

from apexcli.backbones import backbone_of_pipeline
from apexcli.config import ModelConfig
from apexcli.errors import ApexError
from apexcli.fileio import atomic_write
from apexcli.flow.rollout import decode_latents, latent_channels, rollout
from apexcli.models.loading import load_pipeline, resolve_device
from apexcli.models.lora import load_lora_for_inference, resolve_lora_path
from apexcli.models.text_cache import encode_prompts
from apexcli.runs import LORA_FILE

# Bounds that turn absurd requests into one-line errors instead of an allocation failure or a
# job list of 10 GB: 4096 px is 4x SD3's native 1024 (the VAE alone then needs tens of GB), and
# 100k images is days of sampling; split larger jobs (--seed picks up where one left off).
MAX_SIZE = 4096
MAX_IMAGES = 100_000
# the seeds torch.Generator.manual_seed takes: image i of a prompt uses seed + i
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1
METADATA_FILE = "metadata.jsonl"
SAMPLE_NAME = re.compile(r"^\d{5,}-seed-?\d+\.png$")  # the names sample_images gives its PNGs


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
    """Classifier-free guidance (<= 1 disables it); FLUX.1-dev: its distilled guidance."""
    true_cfg_scale: float = 1.0
    """FLUX only: true CFG against ``negative_prompt`` (diffusers' ``true_cfg_scale``); 1 = off."""
    height: int = 512
    """Image height in pixels."""
    width: int = 512
    """Image width in pixels."""
    batch_size: int = 4
    """Images per forward."""
    negative_prompt: str = ""
    """Unconditional prompt of CFG (and of FLUX's true CFG)."""
    overwrite: bool = False
    """Replace an earlier ``apex sample`` output in ``out`` (refused otherwise)."""


def _to_pil(image: torch.Tensor) -> Image.Image:
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def check_request(req: SampleRequest) -> None:
    """ApexError naming the option of the first value out of range, before any model loads."""
    if not req.prompts:
        raise ApexError("no prompts: pass --prompt TEXT or --prompts FILE")
    for flag, value in (
        ("--num-images", req.num_images),
        ("--batch-size", req.batch_size),
        ("--steps", req.steps),
        ("--size", min(req.height, req.width)),
    ):
        if value < 1:
            raise ApexError(f"{flag} must be >= 1, got {value}")
    if max(req.height, req.width) > MAX_SIZE:
        raise ApexError(f"--size {max(req.height, req.width)} is beyond the limit of {MAX_SIZE} pixels a side")
    total = len(req.prompts) * req.num_images
    if total > MAX_IMAGES:
        raise ApexError(
            f"--num-images {req.num_images} x {len(req.prompts)} prompt(s) = {total} images, more than the limit "
            f"of {MAX_IMAGES} per call; split the job (--seed picks up where one left off)"
        )
    if not (MIN_SEED <= req.seed and req.seed + req.num_images - 1 <= MAX_SEED):
        raise ApexError(
            f"--seed {req.seed}: the seeds of its images (seed .. seed + --num-images - 1) must lie in "
            f"{MIN_SEED}..{MAX_SEED}"
        )
    if req.out.exists() and not req.out.is_dir():
        raise ApexError(f"--out '{req.out}' is a file; give a folder for the images and metadata.jsonl")
    if not (math.isfinite(req.guidance_scale) and req.guidance_scale >= 0):
        raise ApexError(f"--guidance must be a finite number >= 0, got {req.guidance_scale}")
    if not (math.isfinite(req.true_cfg_scale) and req.true_cfg_scale >= 1):
        raise ApexError(f"--true-cfg must be a finite number >= 1 (1 = off), got {req.true_cfg_scale}")


def earlier_output(out: Path) -> list[Path]:
    """The files an earlier ``apex sample`` left in ``out``: its metadata.jsonl and its PNGs."""
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.name == METADATA_FILE or SAMPLE_NAME.match(p.name))


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse a folder holding an earlier sample output (its images and metadata.jsonl would be
    overwritten or mixed with the new ones) unless ``overwrite``. Checked before any model loads."""
    earlier = earlier_output(out)
    if earlier and not overwrite:
        raise ApexError(
            f"--out '{out}' already holds apex sample output ({len(earlier)} file(s), e.g. {earlier[0].name}); "
            "choose another --out, or pass --overwrite to replace it"
        )


def prepare_out(out: Path) -> None:
    """Delete an earlier sample output (allowed by ``check_out``), once the model is loaded and
    nothing is left to fail before the first image."""
    for path in earlier_output(out):
        path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _jobs(prompts: Sequence[str], num_images: int, seed: int) -> Iterator[tuple[str, int]]:
    """(prompt, seed) of every image, made as they are needed."""
    for prompt in prompts:
        for i in range(num_images):
            yield prompt, seed + i


def _save_png(image: Image.Image, path: Path) -> None:
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def _warn_foreign_recipe(req: SampleRequest, family) -> None:
    """One line when a released model samples with another family's steps or guidance (a FLUX
    model given the SD3 defaults: no preset, config or run said otherwise)."""
    from apexcli.models.sources import BUILT_IN
    from apexcli.recipes import RECIPE_PRESETS, foreign_recipe_values

    if req.model.pretrained in BUILT_IN:
        return
    foreign = foreign_recipe_values({"eval.num_steps": req.steps, "eval.guidance_scale": req.guidance_scale}, family)
    if foreign:
        print(
            f"warning: a {family.family} model sampled with another family's values: {'; '.join(foreign)}; "
            f"--preset {RECIPE_PRESETS[family.family]}, --steps or --guidance set its own",
            file=sys.stderr,
        )


@torch.no_grad()
def sample_images(req: SampleRequest) -> list[Path]:
    """Write the images and ``metadata.jsonl`` (file, prompt, seed, steps, guidance, true_cfg, lora), each
    image as it is made, its metadata line appended once the image is on disk: an interrupted
    run leaves every finished image, described."""
    check_request(req)
    check_out(req.out, req.overwrite)
    device = resolve_device(req.model.device)
    pipe = load_pipeline(req.model)
    family = backbone_of_pipeline(pipe)
    family.check_true_cfg(req.true_cfg_scale, "--true-cfg")
    _warn_foreign_recipe(req, family)
    lora_dir = None
    if req.lora:
        lora_dir = resolve_lora_path(req.lora)
        # name the file: given only a folder, diffusers guesses among its .safetensors files
        given = Path(req.lora).expanduser()
        weight_file = given if given.is_file() else lora_dir / LORA_FILE
        load_lora_for_inference(
            pipe, weight_file
        )  # refuses a LoRA of another model: metadata records only what applied
        if given.is_file():
            lora_dir = given  # metadata names the exact file
    pipe.to(device)
    prepare_out(req.out)
    jobs = _jobs(req.prompts, req.num_images, req.seed)
    seq = req.model.max_sequence_length
    uncond = encode_prompts(pipe, [req.negative_prompt], max_sequence_length=seq, device=device)
    channels = latent_channels(pipe.transformer)
    f = pipe.vae_scale_factor
    written: list[Path] = []
    with open(req.out / METADATA_FILE, "a", encoding="utf-8") as metadata:
        while chunk := list(itertools.islice(jobs, req.batch_size)):
            cond = encode_prompts(pipe, [p for p, _ in chunk], max_sequence_length=seq, device=device)
            noise = torch.stack(
                [
                    torch.randn((channels, req.height // f, req.width // f), generator=torch.Generator().manual_seed(s))
                    for _, s in chunk
                ]
            ).to(device)
            traj = rollout(
                pipe.transformer,
                pipe.scheduler,
                cond,
                num_steps=req.steps,
                height=req.height,
                width=req.width,
                vae_scale_factor=f,
                guidance_scale=req.guidance_scale,
                uncond=uncond,
                true_cfg_scale=req.true_cfg_scale,
                sampler="ode",
                initial_noise=noise,
            )
            images = decode_latents(pipe.vae, traj.final)
            for j, (prompt, seed) in enumerate(chunk):
                name = f"{len(written):05d}-seed{seed}.png"
                _save_png(_to_pil(images[j]), req.out / name)
                written.append(req.out / name)
                row = {
                    "file": name,
                    "prompt": prompt,
                    "seed": seed,
                    "steps": req.steps,
                    "guidance": req.guidance_scale,
                    "true_cfg": req.true_cfg_scale,
                    "height": req.height,
                    "width": req.width,
                    "lora": str(lora_dir) if lora_dir else None,
                }
                metadata.write(json.dumps(row) + "\n")
                metadata.flush()
    return written


def sample_from_options(
    *,
    prompts: list[str],
    prompts_file: Path | None,
    out: Path,
    lora: str | None,
    preset: str | None,
    config_file: Path | None,
    model: str | None,
    num_images: int,
    seed: int,
    steps: int | None,
    guidance: float | None,
    size: int | None,
    true_cfg: float | None = None,
    batch_size: int,
    device: str | None,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
) -> list[Path]:
    """Fill a SampleRequest from CLI options, ``key=value`` overrides and the preset/config
    defaults (with neither, the config of the run ``lora`` comes from, if it does), then sample. The explicit options win over the overrides: they name one thing.
    Paths may start with ~ (the shell leaves ``--out=~/x`` alone)."""
    from apexcli.config import resolve_config, validate
    from apexcli.prompts import load_prompts
    from apexcli.runs import run_config_of

    out, prompts_file, config_file = (
        None if p is None else Path(p).expanduser() for p in (out, prompts_file, config_file)
    )
    if preset is None and config_file is None and lora is not None:
        # a run's LoRA samples as the run evaluates: its model, size, steps and guidance
        config_file = run_config_of(lora)
    cfg = resolve_config(preset=preset, config_file=config_file, overrides=list(overrides))
    explicit = {key: value for key, value in (("pretrained", model), ("device", device)) if value is not None}
    if explicit:
        cfg = replace(cfg, model=replace(cfg.model, **explicit))
        validate(cfg)
    all_prompts = list(prompts) + (load_prompts(str(prompts_file)) if prompts_file else [])
    return sample_images(
        SampleRequest(
            model=cfg.model,
            prompts=all_prompts,
            out=out,
            lora=lora,
            num_images=num_images,
            seed=seed,
            steps=cfg.eval.num_steps if steps is None else steps,
            guidance_scale=cfg.eval.guidance_scale if guidance is None else guidance,
            true_cfg_scale=cfg.eval.true_cfg_scale if true_cfg is None else true_cfg,
            height=cfg.model.resolution if size is None else size,
            width=cfg.model.resolution if size is None else size,
            batch_size=batch_size,
            negative_prompt=cfg.sampling.negative_prompt,
            overwrite=overwrite,
        )
    )
