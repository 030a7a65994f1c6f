"""``apex sample``: parse options, call ``apexcli.sample.sample_images``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def sample(
    overrides: Annotated[
        list[str] | None,
        typer.Argument(
            help="Config overrides KEY=VALUE, dotted, as for `apex train`, e.g. eval.num_steps=20 model.resolution=256 (sampling reads model.*, eval.num_steps, eval.guidance_scale, eval.true_cfg_scale, sampling.negative_prompt). --steps, --guidance, --true-cfg, --size, --model and --device win over them.",
            show_default=False,
        ),
    ] = None,
    prompt: Annotated[list[str] | None, typer.Option("--prompt", help="A prompt (repeatable).")] = None,
    prompts: Annotated[
        Path | None, typer.Option("--prompts", help='Prompt file: .txt (one per line) or .jsonl ({"prompt": ...}).')
    ] = None,
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Output folder for PNGs and metadata.jsonl (~ is your home). Each image is written as it is made and its metadata line appended then; a folder that already holds apex sample output is refused unless --overwrite.",
        ),
    ] = Path("samples"),
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace the apex sample output already in --out: its PNGs and metadata.jsonl are deleted first.",
        ),
    ] = False,
    lora: Annotated[
        str | None,
        typer.Option(help="LoRA: a checkpoint dir, a run dir (its latest checkpoint) or a .safetensors file."),
    ] = None,
    preset: Annotated[
        str | None, typer.Option(help="Preset giving the base model and sampling defaults (tiny, mini, sd35m, ...).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML config giving the base model (e.g. a run's config.yaml).")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Hub id or local directory of the SD3 pipeline (overrides the preset).")
    ] = None,
    num_images: Annotated[int, typer.Option(help="Images per prompt (at most 100000 images per call in all).")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the first image; image i uses seed + i.")] = 0,
    steps: Annotated[int | None, typer.Option(help="ODE steps (default: the preset's eval.num_steps).")] = None,
    guidance: Annotated[
        float | None,
        typer.Option(help="CFG scale; FLUX.1-dev: its distilled guidance (default: the preset's eval.guidance_scale)."),
    ] = None,
    true_cfg: Annotated[
        float | None,
        typer.Option(
            "--true-cfg",
            help="FLUX only: true CFG scale against sampling.negative_prompt, as diffusers' true_cfg_scale; 1 = off, "
            "more doubles the forwards (default: the preset's eval.true_cfg_scale).",
        ),
    ] = None,
    size: Annotated[int | None, typer.Option(help="Square image size in pixels (default: model.resolution).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 4,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N.")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Config override KEY=VALUE (repeatable; same as a positional override)."),
    ] = None,
) -> None:
    """Generate images (PNG + metadata.jsonl, the format `apex score` reads)."""
    from apexcli.sample import sample_from_options

    written = sample_from_options(
        prompts=list(prompt or []),
        prompts_file=prompts,
        out=out,
        lora=lora,
        preset=preset,
        config_file=config,
        model=model,
        num_images=num_images,
        seed=seed,
        steps=steps,
        guidance=guidance,
        true_cfg=true_cfg,
        size=size,
        batch_size=batch_size,
        device=device,
        overrides=list(overrides or []) + list(set_ or []),
        overwrite=overwrite,
    )
    typer.echo(f"{len(written)} images and metadata.jsonl written to {out.expanduser()}")
