"""A preset's GPU memory plan, COMPUTED on the meta device (no weights, no GPU): the tables of docs/memory.md.

    python benchmarks/memory_plan.py                       # sd35m-1gpu: tables + one JSON line
    python benchmarks/memory_plan.py --preset sd35l --gpu-gib 80
    python benchmarks/memory_plan.py --preset flux1-dev-1gpu
    python benchmarks/memory_plan.py --preset flux1-dev --world-size 8   # per GPU of an 8-process DDP run

The computation lives in ``apexcli.models.memory_plan`` (``plan_memory``); this script prints it
for the preset as configured and for the variants the doc compares: gradient checkpointing off,
and for SD3 no CFG (``sampling.guidance_scale=1``), for FLUX true CFG (``sampling.true_cfg_scale``
above 1: an unconditional forward beside the conditional one; FLUX.1-dev's distilled guidance is
an input of its one forward, so ``guidance_scale`` moves no memory). ``benchmarks/memory_measure.py``
checks the computation against real tensors on the CPU.
"""

from __future__ import annotations

import argparse
import json

from apexcli.config import Config, resolve_config
from apexcli.errors import ApexError
from apexcli.models.memory_families import family_of_config
from apexcli.models.memory_plan import GB, MemoryPlan, StepMemory, plan_memory, transformer_config_for

CFG_VARIANT = {"sd3": ("no CFG", "sampling.guidance_scale=1"), "flux": ("true CFG", "sampling.true_cfg_scale=2")}
"""Each family's guidance variant: SD3 without CFG, FLUX with true CFG."""


def variants(cfg: Config, family: str) -> dict[str, list[str]]:
    """The variants a plan is printed with, as overrides of the preset: as configured, gradient
    checkpointing the other way, the family's guidance variant."""
    ckpt = cfg.model.gradient_checkpointing
    name, override = CFG_VARIANT[family]
    return {
        "as configured": [],
        "no checkpointing" if ckpt else "checkpointing": [f"model.gradient_checkpointing={str(not ckpt).lower()}"],
        name: [override],
    }


def variant_config(preset: str, overrides: list[str]) -> Config:
    """The preset with ``overrides``; ``sampling.true_cfg_scale`` is set on the resolved config
    where the config has no such key (the plan reads it with ``getattr``)."""
    true_cfg = [o for o in overrides if o.startswith("sampling.true_cfg_scale=")]
    try:
        return resolve_config(preset=preset, overrides=overrides)
    except ApexError:
        if not true_cfg:
            raise
    cfg = resolve_config(preset=preset, overrides=[o for o in overrides if o not in true_cfg])
    cfg.sampling.true_cfg_scale = float(true_cfg[0].partition("=")[2])
    return cfg


def print_rows(plan: MemoryPlan) -> None:
    print(f"{'row':<22}{'where':<11}{'GB':>9}  detail")
    for r in plan.rows:
        print(f"{r.key:<22}{r.where:<11}{r.nbytes / GB:9.3f}  {r.detail}")


def print_step(name: str, step: StepMemory) -> None:
    s = step.shape
    ws = max(step.block_working_set, default=0)
    saved = max(step.block_saved, default=0)
    print(
        f"{name:<18} forward batch {s.forward_batch:>2}, {s.image_tokens}+{s.text_tokens} tokens, checkpointing "
        f"{'on ' if step.checkpointing else 'off'}: kept {step.kept / GB:6.2f}  "
        f"reference peak {step.reference_peak / GB:6.2f}  backward peak {step.backward_peak / GB:6.2f}  "
        f"PEAK {step.peak / GB:6.2f} GB"
        + (f"  (max block working set {ws / GB:.2f})" if ws else f"  (max block saved {saved / GB:.2f})")
    )


def print_totals(name: str, plan: MemoryPlan) -> None:
    for deqa in (False, True):
        fits = plan.fits(deqa)
        verdict = "" if fits is None else ("  fits" if fits else "  DOES NOT FIT")
        print(
            f"{name:<18} DeQA {'on this GPU ' if deqa else 'elsewhere   '} resident {plan.resident(deqa) / GB:6.2f}  "
            f"training peak {plan.peak(deqa) / GB:6.2f}  while encoding {plan.encoding_peak(deqa) / GB:6.2f} GB{verdict}"
        )


def summary(plan: MemoryPlan) -> dict:
    s = plan.step
    return {
        "rows": {r.key: {"bytes": r.nbytes, "where": r.where, "detail": r.detail} for r in plan.rows},
        "resident": plan.resident(),
        "resident_deqa_here": plan.resident(True),
        "peak": plan.peak(),
        "peak_deqa_here": plan.peak(True),
        "encoding_peak_deqa_here": plan.encoding_peak(True),
        "fits_deqa_here": plan.fits(True),
        "step": {
            "forward_batch": s.shape.forward_batch,
            "image_tokens": s.shape.image_tokens,
            "text_tokens": s.shape.text_tokens,
            "checkpointing": s.checkpointing,
            "kept": s.kept,
            "reference_peak": s.reference_peak,
            "backward_peak": s.backward_peak,
            "peak": s.peak,
            "outside_saved": s.outside_saved,
            "block_saved": list(s.block_saved),
            "block_saved_raw": list(s.block_saved_raw),
            "block_working_set": list(s.block_working_set),
        },
    }


TRAINER_ROWS = (
    "transformer",
    "pos_embed",
    "transformer_buffers",
    "vae",
    "lora_weights",
    "lora_grads",
    "adamw_states",
    "lora_ema",
    "trajectories",
    "step_embeds",
)
"""What ``bench_train.py --arch sd35m`` keeps on its device: no reward towers (toy rewards), no
text encoders (freed after caching). The buffers row is SD3's ``pos_embed``; FLUX has none."""


def trainer_plan(cfg, transformer_config: dict) -> dict[str, int]:
    """Bytes of the trainer's resident rows plus its training micro-step's peak, for ``cfg`` on
    ``transformer_config`` (SD3 or FLUX, its family read off the config): the plan
    ``bench_train.py --arch sd35m`` reads its measured peak against."""
    plan = plan_memory(cfg, transformer=transformer_config)
    rows = {r.key: r.nbytes for r in plan.rows if r.key in TRAINER_ROWS}
    rows["activations_train"] = plan.step.peak
    return {**rows, "total": sum(rows.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="sd35m-1gpu")
    parser.add_argument(
        "--gpu-gib",
        type=float,
        default=80 * 1e9 / 2**30,
        help="GPU memory for the verdict, GiB (default: 80 GB, an H100's nominal size)",
    )
    parser.add_argument(
        "--world-size",
        type=int,
        default=1,
        help="processes of a data-parallel (DDP) run: each holds every model and samples its share of a step",
    )
    args = parser.parse_args()
    gpu = int(args.gpu_gib * 2**30)
    preset = resolve_config(preset=args.preset)
    family = family_of_config(transformer_config_for(preset)).name
    plans = {
        name: plan_memory(variant_config(args.preset, o), gpu, world_size=args.world_size)
        for name, o in variants(preset, family).items()
    }
    per_gpu = f", per GPU of {args.world_size} DDP processes" if args.world_size > 1 else ""
    print(f"{args.preset} ({family}), as configured{per_gpu} (GB = 1e9 bytes)")
    print_rows(plans["as configured"])
    print("\ntraining micro-step")
    for name, plan in plans.items():
        print_step(name, plan.step)
    print(f"\ntotals on {gpu / GB:.1f} GB")
    for name, plan in plans.items():
        print_totals(name, plan)
    head = {"preset": args.preset, "family": family, "world_size": args.world_size, "gpu_bytes": gpu}
    print(json.dumps({**head, **{name: summary(p) for name, p in plans.items()}}))


if __name__ == "__main__":
    main()
