"""Measure a pipeline on the world's held-out prompts with fixed seeds.

    python -m apexcli.tools.mini_evaluate --model mini --prompts 64 --guidance 4 --shift 2 --out runs/mini-eval

For shapes prompts it reads the image back from its pixels (`measure.read_shapes`) and reports
each attribute's accuracy and their mean (adherence). Chance is the same images scored against
the prompts rotated by one place (another prompt of the same set): what adherence a model that
ignores the prompt would get. Sign prompts are scored with the `ocr` reward (RapidOCR).
Image i is sampled with the generator seeded `seed + i`, so numbers are reproducible.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from PIL import Image

from apexcli.images import image_grid
from apexcli.world.grammar import parse_prompt
from apexcli.world.grammar import prompts as world_prompts
from apexcli.world.measure import attribute_matches, read_shapes


@torch.no_grad()
def sample_fixed(
    pipe: StableDiffusion3Pipeline,
    texts: list[str],
    seed: int,
    guidance: float,
    steps: int,
    batch: int = 16,
    resolution: int = 64,
) -> list[Image.Image]:
    """Image i from the generator seeded seed + i, in batches."""
    pipe.set_progress_bar_config(disable=True)
    images: list[Image.Image] = []
    for start in range(0, len(texts), batch):
        chunk = texts[start : start + batch]
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        images += pipe(
            prompt=chunk,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=resolution,
            width=resolution,
            generator=gens,
            max_sequence_length=pipe.tokenizer.model_max_length,
            output_type="pil",
        ).images
    return images


def adherence_scores(images: list[Image.Image], texts: list[str]) -> dict[str, float]:
    """Per-attribute accuracy and mean adherence over the shapes prompts, and the chance level."""
    idx = [i for i, t in enumerate(texts) if (s := parse_prompt(t)) is not None and s.kind == "shapes"]
    if not idx:
        return {}
    readings = {i: read_shapes(images[i]) for i in idx}
    per_attr: dict[str, list[float]] = {}
    means, chance = [], []
    for k, i in enumerate(idx):
        matches = attribute_matches(parse_prompt(texts[i]), readings[i])
        for name, ok in matches.items():
            per_attr.setdefault(name, []).append(float(ok))
        means.append(np.mean(list(matches.values())))
        other = parse_prompt(texts[idx[(k + 1) % len(idx)]])  # another prompt: chance
        chance.append(np.mean(list(attribute_matches(other, readings[i]).values())))
    out = {f"acc_{name}": float(np.mean(v)) for name, v in per_attr.items()}
    out.update(adherence=float(np.mean(means)), adherence_chance=float(np.mean(chance)), n_shapes=len(idx))
    return out


def ocr_scores(images: list[Image.Image], texts: list[str]) -> dict[str, float]:
    from apexcli.rewards.config import OcrConfig
    from apexcli.rewards.ocr import OcrReward

    idx = [i for i, t in enumerate(texts) if (s := parse_prompt(t)) is not None and s.kind == "sign"]
    if not idx:
        return {}
    reward = OcrReward(OcrConfig(workers=2))
    try:
        scores, info = reward([images[i] for i in idx], [texts[i] for i in idx])
    finally:
        reward.close()
    return {
        "ocr": float(scores.mean()),
        "ocr_exact": float((scores == 1).float().mean()),
        "n_signs": len(idx),
        "ocr_read": info["text"][:8],
    }


def evaluate(
    pipe: StableDiffusion3Pipeline,
    n: int = 64,
    seed: int = 0,
    guidance: float = 4.0,
    steps: int = 10,
    shift: float | None = None,
    out: Path | None = None,
) -> dict:
    if shift is not None:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=shift)
    texts = world_prompts(n, seed=seed, split="eval")
    start = time.monotonic()
    images = sample_fixed(pipe, texts, seed=seed, guidance=guidance, steps=steps)
    result = {
        "n": n,
        "seed": seed,
        "guidance": guidance,
        "steps": steps,
        "shift": pipe.scheduler.config.shift,
        "sample_s": round(time.monotonic() - start, 1),
    }
    result.update(adherence_scores(images, texts))
    result.update(ocr_scores(images, texts))
    if out is not None:
        from apexcli.world.render import render

        out.mkdir(parents=True, exist_ok=True)
        image_grid(images[:32], scale=2).save(out / f"eval_g{guidance}_s{result['shift']}.png")
        # rows of 8: ground truth, then the model's sample for the same prompt
        truth = [render(parse_prompt(t), 64) for t in texts[:16]]
        rows = truth[:8] + images[:8] + truth[8:16] + images[8:16]
        image_grid(rows, columns=8).save(out / f"truth_vs_sample_g{guidance}_s{result['shift']}.png")
    return result


def sampling_speed(
    pipe: StableDiffusion3Pipeline, guidance: float, steps: int = 10, n: int = 8, repeats: int = 3
) -> dict:
    """Seconds to sample n images at `steps` steps: the best wall time of a few repeats, and the
    process CPU time per repeat (on a shared machine, wall time includes waiting for a core)."""
    texts = world_prompts(n, seed=1, split="eval")
    sample_fixed(pipe, texts, seed=0, guidance=guidance, steps=2)  # warm-up
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        sample_fixed(pipe, texts, seed=0, guidance=guidance, steps=steps)
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return {
        "images": n,
        "steps": steps,
        "guidance": guidance,
        "threads": torch.get_num_threads(),
        "best_wall_s": round(min(walls), 2),
        "cpu_s": round(float(np.mean(cpus)), 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Evaluate a pipeline on the world's held-out prompts.")
    parser.add_argument("--model", default="mini", help="mini, or a diffusers SD3 directory")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, nargs="+", default=[4.0])
    parser.add_argument("--shift", type=float, nargs="+", default=[None])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="save sample grids here")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--speed", action="store_true", help="only time sampling 8 images at --steps steps")
    args = parser.parse_args(argv)
    from apexcli.config import ModelConfig
    from apexcli.models.loading import load_pipeline

    torch.set_num_threads(args.threads)
    pipe = load_pipeline(ModelConfig(pretrained=args.model, dtype="float32"))
    if args.speed:
        for g in args.guidance:
            print(json.dumps(sampling_speed(pipe, g, args.steps)), flush=True)
        return
    for g in args.guidance:
        for s in args.shift:
            print(json.dumps(evaluate(pipe, args.prompts, args.seed, g, args.steps, s, args.out)), flush=True)


if __name__ == "__main__":
    main()
