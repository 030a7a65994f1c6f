"""Training memory MEASURED on the CPU with real tensors, against the plan's meta computation
(SD3.5-M or FLUX.1-dev at their published widths, depth cut).

    python benchmarks/memory_measure.py               # SD3.5-M, 24 blocks, 1 sample + CFG, 256 px (a few minutes on 2 cores)
    python benchmarks/memory_measure.py --layers 3    # blocks 0 (dual attention), 1, 2 (last) only: ~1 minute
    python benchmarks/memory_measure.py --skip-host   # without the host-RAM-while-loading part
    python benchmarks/memory_measure.py --samples 4 --resolution 512 --checkpointing-only --skip-host
                                                      # sd35m-1gpu's own micro-batch (forward batch 8, 512 px)
    python benchmarks/memory_measure.py --family flux1-dev
                                                      # FLUX.1-dev, 1 double- + 1 single-stream block, 256 px
    python benchmarks/memory_measure.py --family flux1-dev --samples 4 --resolution 512 --skip-host
                                                      # flux1-dev-1gpu's micro-batch (forward batch 4, 512 px)

The transformer has the family's published widths, random weights, bf16 base and float32 LoRA
attached by ``attach_lora`` (as the trainer does); one GRPO micro-step runs as ``Trainer._update``
runs it (policy forward with grad, no-grad reference forward with the adapters off, loss,
backward), with gradient checkpointing off and on. The same step runs on a meta twin: that is the
plan's number. SD3.5-M runs with CFG 4.5 (forward batch twice the samples), FLUX.1-dev with its
distilled guidance 3.5 (one forward per sample).

What is measured, and why this way:

- allocator peak: the most bytes PyTorch's CPU allocator holds during the step, from the
  profiler's memory events, which carry the allocator's running total. It is the CPU's
  ``torch.cuda.max_memory_allocated``: every tensor, kernel workspaces included, nothing of
  malloc's caching. RSS is not that: glibc keeps freed pages for the next step, and the
  profiler's own buffers count, so RSS is used for loading only;
- live tensor bytes on the CPU (``LiveBytes``, the plan's tracker run on real tensors): separates
  "meta vs real kernels" (CPU live vs meta live) from "tensors vs allocator" (workspaces);
- saved tensors per block, raw and deduplicated by storage ``data_ptr`` (real tensors) against the
  meta run's deduplication by storage;
- host RAM while loading: peak RSS (``VmHWM``; anonymous and file-backed parts sampled every 2 ms)
  of a fresh process loading a real-shape pipeline (SD3.5-M: 2 or 6 blocks; FLUX.1-dev: 1 or 2
  blocks of each kind; 1 layer per text encoder) saved to disk in bf16 or fp16, through
  ``load_pipeline`` (``from_pretrained(torch_dtype=bfloat16)``), then reading every page of its
  weights as a copy to the GPU would; and, for SD3.5-M, the peak of building its ``PatchEmbed``
  alone, whose sincos table is computed in float64.

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from apexcli.backbones.base import JOINT_ATTENTION_PROJECTIONS
from apexcli.models import memory_plan as mp
from apexcli.models.architectures import FLUX1_DEV_TRANSFORMER, SD35M_TRANSFORMER
from apexcli.models.memory_families import family_of_config

MB = 1e6
T5_TOKENS = 128
"""The presets' T5 length (``model.max_sequence_length``)."""
FAMILIES = {
    "sd35m": dict(
        published=SD35M_TRANSFORMER,
        lora=dict(rank=32, alpha=64, dropout=0.0, target_modules=JOINT_ATTENTION_PROJECTIONS, seed=0),
        guidance=4.5,
        layers=SD35M_TRANSFORMER["num_layers"],
        host_cases=((2, "bfloat16"), (6, "bfloat16"), (2, "float16")),
    ),
    "flux1-dev": dict(
        published=FLUX1_DEV_TRANSFORMER,
        lora=dict(rank=32, alpha=64, dropout=0.0, target_modules=JOINT_ATTENTION_PROJECTIONS, seed=0),
        guidance=3.5,
        layers=1,
        host_cases=((1, "bfloat16"), (2, "bfloat16")),
    ),
}
"""What each ``--family`` measures: its published transformer, the presets' LoRA, its guidance,
the default depth (SD3.5-M: all 24 blocks; FLUX.1-dev: 1 double- and 1 single-stream block of its
19 + 38), and the real-shape pipelines whose loading is measured (blocks, dtype on disk; a FLUX
pipeline with N has N blocks of each kind). Depth varies the weights at fixed widths; float16 on
disk makes the bfloat16 load convert."""


def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon and RssFile of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def reset_rss_peak() -> None:
    """Reset the kernel's high-water mark of this process's RSS (``VmHWM``)."""
    Path("/proc/self/clear_refs").write_text("5")


def transformer_config(family: str, layers: int, single_layers: int = 1) -> dict:
    """The family's published transformer cut to ``layers`` blocks (FLUX: ``layers`` double- and
    ``single_layers`` single-stream blocks); a cut SD3.5-M keeps one dual-attention block (0)."""
    if family == "flux1-dev":
        return dict(FLUX1_DEV_TRANSFORMER, num_layers=layers, num_single_layers=single_layers)
    config = dict(SD35M_TRANSFORMER, num_layers=layers)
    if layers < SD35M_TRANSFORMER["num_layers"]:
        config["dual_attention_layers"] = (0,)
    return config


def measure_step(model: torch.nn.Module, shape: mp.StepShape, checkpointing: bool) -> dict:
    """One micro-step on the CPU: allocator peak and live tensor accounting."""
    inputs = mp.step_inputs(model.config, shape, "cpu")
    mp.allocate_lora_grads(model)
    gc.collect()
    box: dict = {}
    start = time.perf_counter()
    run = lambda: box.setdefault("step", mp.step_memory(model, inputs, shape, checkpointing=checkpointing))
    peak = mp.cpu_allocator_peak(run)
    return {"allocator_peak": peak, "live": box["step"], "seconds": time.perf_counter() - start}


def measure_forward(model: torch.nn.Module, shape: mp.StepShape) -> dict:
    """One no-grad forward (a rollout step) on the CPU: allocator peak and live tensor peak."""
    inputs = mp.step_inputs(model.config, shape, "cpu")
    box: dict = {}
    peak = mp.cpu_allocator_peak(lambda: box.setdefault("live", mp.forward_peak(model, inputs, shape)))
    return {"allocator_peak": peak, "cpu_live_peak": box["live"]}


def block_kinds(family: str, layers: int, single_layers: int) -> dict[int, str]:
    """The blocks shown: each block structure once (FLUX: the first double- and single-stream)."""
    if family == "flux1-dev":
        return {0: "double-stream, block 0", layers: "single-stream, first"}
    if layers < SD35M_TRANSFORMER["num_layers"]:
        return {0: "dual attention, block 0", 1: "plain", layers - 1: "last (no text output)"}
    return {0: "dual attention, block 0", 1: "dual attention", 13: "plain", layers - 1: "last (no text output)"}


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def block_table(kinds: dict[int, str], cpu: dict[bool, dict], meta: dict[bool, mp.StepMemory]) -> list[dict]:
    """Per shown block: saves (from the run without checkpointing), working set (from the run with)."""
    rows = []
    for b, kind in kinds.items():
        row: dict = {"block": b, "kind": kind}
        if False in cpu:
            off = cpu[False]["live"]
            row.update(
                raw_measured=off.block_saved_raw[b],
                raw_computed=meta[False].block_saved_raw[b],
                unique_measured=off.block_saved_by_data_ptr[b],
                unique_computed=meta[False].block_saved[b],
            )
        if True in cpu:
            row.update(
                working_set_measured=cpu[True]["live"].block_working_set[b],
                working_set_computed=meta[True].block_working_set[b],
            )
        rows.append(row)
    return rows


def print_blocks(rows: list[dict], shape: mp.StepShape) -> None:
    print(
        f"\nper block, forward batch {shape.forward_batch}, {shape.image_tokens}+{shape.text_tokens} tokens (MB; "
        "measured = CPU real tensors, computed = meta)"
    )
    print(f"{'block':<28}{'saved raw':>22}{'saved unique':>22}{'ckpt working set':>22}")
    for r in rows:
        cells = [(r.get(k + "_measured"), r.get(k + "_computed")) for k in ("raw", "unique", "working_set")]
        cells = [f"{m / MB:7.1f} /{c / MB:7.1f} ={ratio(m, c):5.3f}" if m is not None else "-" for m, c in cells]
        print(f"{r['block']:>2} {r['kind']:<25}" + "".join(f"{c:>22}" for c in cells))


def full_table(cpu: dict[bool, dict], meta: dict[bool, mp.StepMemory]) -> list[dict]:
    rows = []
    for ckpt in cpu:
        m, c = meta[ckpt], cpu[ckpt]
        rows.append(
            {
                "checkpointing": ckpt,
                "allocator_peak": c["allocator_peak"],
                "cpu_live_peak": c["live"].peak,
                "computed_peak": m.peak,
                "computed_kept": m.kept,
                "computed_max_block_working_set": max(m.block_working_set, default=0),
                "measured_over_computed": ratio(c["allocator_peak"], m.peak),
                "seconds": c["seconds"],
            }
        )
    return rows


def print_full(rows: list[dict], layers: int) -> None:
    print(f"\nwhole micro-step, {layers} blocks (MB)")
    print(
        f"{'checkpointing':<14}{'allocator':>11}{'CPU live':>10}{'computed':>10}{'meas/comp':>10}"
        f"{'kept':>9}{'max W':>8}"
    )
    for r in rows:
        print(
            f"{'on' if r['checkpointing'] else 'off':<14}{r['allocator_peak'] / MB:11.1f}{r['cpu_live_peak'] / MB:10.1f}"
            f"{r['computed_peak'] / MB:10.1f}{r['measured_over_computed']:10.3f}"
            f"{r['computed_kept'] / MB:9.1f}{r['computed_max_block_working_set'] / MB:8.1f}"
        )


LOAD_CHILD = """
import json, sys, threading, time
sys.path.insert(0, {bench!r})
from memory_measure import proc_status, reset_rss_peak
from apexcli.config import ModelConfig
from apexcli.models.loading import load_pipeline
before = proc_status()
reset_rss_peak()
peaks = {{"RssAnon": 0, "RssFile": 0}}
done = threading.Event()
def sample():
    while not done.is_set():
        now = proc_status()
        for k in peaks:
            peaks[k] = max(peaks[k], now[k])
        time.sleep(0.002)
thread = threading.Thread(target=sample)
thread.start()
pipe = load_pipeline(ModelConfig(pretrained={path!r}, dtype="bfloat16"))
done.set()
thread.join()
loaded = proc_status()
modules = [m for m in pipe.components.values() if hasattr(m, "parameters")]
for t in (t for m in modules for t in (*m.parameters(), *m.buffers())):
    t.detach().reshape(-1)[::1024].float().sum()  # one value a page, as a copy to the GPU reads them
buffers = [str(b.dtype) for b in pipe.transformer.buffers()]
print(json.dumps({{"before": before, "loaded": loaded, "touched": proc_status(), "sampled_peaks": peaks,
                  "weights": sum(t.numel() * t.element_size() for m in modules for t in (*m.parameters(), *m.buffers())),
                  "buffer_dtype": buffers[0] if buffers else None}}))
"""

BUILD_CHILD = """
import json, sys
sys.path.insert(0, {bench!r})
from memory_measure import proc_status, reset_rss_peak
from diffusers.models.embeddings import PatchEmbed
from apexcli.models.architectures import SD35M_TRANSFORMER as c
before = proc_status()["VmRSS"]
reset_rss_peak()
embed = PatchEmbed(height=c["sample_size"], width=c["sample_size"], patch_size=c["patch_size"], in_channels=c["in_channels"],
                   embed_dim=c["num_attention_heads"] * c["attention_head_dim"], pos_embed_max_size=c["pos_embed_max_size"])
print(json.dumps({{"peak_rise": proc_status()["VmHWM"] - before, "values": embed.pos_embed.numel()}}))
"""


def _child_json(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def pos_embed_build() -> dict:
    """Peak RSS rise of building SD3.5-M's PatchEmbed alone (its sincos table), in a fresh process."""
    child = _child_json(BUILD_CHILD.format(bench=str(Path(__file__).resolve().parent)))
    return {**child, "bytes_per_value": child["peak_rise"] / child["values"]}


SAVE = {
    "sd35m": "save_real_shape_sd3({tmp!r}, 'sd35m', num_layers={layers}, dtype=torch.{dtype})",
    "flux1-dev": "build_real_shape_flux(num_layers={layers}, num_single_layers={layers}, dtype=torch.{dtype})"
    ".save_pretrained({tmp!r}, safe_serialization=True)",
}
"""How each family's real-shape pipeline is saved (``models/real_shape.py``)."""


def host_loading(family: str, layers: int, disk_dtype: str) -> dict:
    """Peak RSS of a fresh process loading a saved real-shape pipeline in bfloat16, then reading
    one value of every page of its weights (as a copy to the GPU does)."""
    with tempfile.TemporaryDirectory() as tmp:
        save = (
            "import torch; from apexcli.models.real_shape import build_real_shape_flux, save_real_shape_sd3; "
            + SAVE[family].format(tmp=tmp, layers=layers, dtype=disk_dtype)
        )
        subprocess.run([sys.executable, "-c", save], check=True, capture_output=True)
        disk = sum(f.stat().st_size for f in Path(tmp).rglob("*.safetensors"))
        child = _child_json(LOAD_CHILD.format(bench=str(Path(__file__).resolve().parent), path=tmp))
    b, loaded, touched, peaks = child["before"], child["loaded"], child["touched"], child["sampled_peaks"]
    return {
        "layers": layers,
        "disk_dtype": disk_dtype,
        "disk_bytes": disk,
        "weights_bytes": child["weights"],
        "load_peak_rise": loaded["VmHWM"] - b["VmRSS"],
        "load_anon_peak_rise": peaks["RssAnon"] - b["RssAnon"],
        "load_file_peak_rise": peaks["RssFile"] - b["RssFile"],
        "loaded_rise": loaded["VmRSS"] - b["VmRSS"],
        "touched_rise": touched["VmRSS"] - b["VmRSS"],
        "touched_file_rise": touched["RssFile"] - b["RssFile"],
        "buffer_dtype": child["buffer_dtype"],
    }


def print_host(build: dict | None, loads: list[dict]) -> None:
    print("\nhost RAM (MB)")
    if build is not None:
        print(
            f"Building SD3.5-M's PatchEmbed alone: peak RSS +{build['peak_rise'] / MB:.0f} "
            f"= {build['bytes_per_value']:.2f} bytes per pos_embed value ({build['values']:,} values)"
        )
    print(
        f"{'pipeline':<22}{'on disk':>9}{'load peak':>11}{'anon':>8}{'file':>8}{'loaded':>8}{'read':>8}{'read file':>11}"
        f"{'peak/disk':>11}"
    )
    for h in loads:
        print(
            f"{h['layers']} blocks, {h['disk_dtype']:<11}{h['disk_bytes'] / MB:9.0f}{h['load_peak_rise'] / MB:11.0f}"
            f"{h['load_anon_peak_rise'] / MB:8.0f}{h['load_file_peak_rise'] / MB:8.0f}{h['loaded_rise'] / MB:8.0f}"
            f"{h['touched_rise'] / MB:8.0f}{h['touched_file_rise'] / MB:11.0f}"
            f"{h['load_peak_rise'] / h['disk_bytes']:11.2f}"
        )
    print(f"transformer buffers after loading: {loads[0]['buffer_dtype'] or 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="sd35m", help="the published transformer")
    parser.add_argument(
        "--layers", type=int, default=None, help="transformer blocks (SD3.5-M: 24, all; FLUX: double-stream, 1)"
    )
    parser.add_argument("--single-layers", type=int, default=1, help="FLUX's single-stream blocks (default 1)")
    parser.add_argument("--samples", type=int, default=1, help="samples per micro-batch (SD3: x2 forwards with CFG)")
    parser.add_argument("--resolution", type=int, default=256, help="image side in pixels")
    parser.add_argument("--skip-host", action="store_true", help="leave out the host-RAM-while-loading measurement")
    parser.add_argument(
        "--checkpointing-only",
        action="store_true",
        help="only the step with gradient checkpointing (sd35m-1gpu's micro-batch without it needs ~26 GB)",
    )
    args = parser.parse_args()
    spec = FAMILIES[args.family]
    layers = args.layers or spec["layers"]
    lora = spec["lora"]
    torch.manual_seed(0)
    config = transformer_config(args.family, layers, args.single_layers)
    family = family_of_config(config)
    shape = mp.StepShape(
        args.samples, args.resolution // 8, family.text_tokens(T5_TOKENS), spec["guidance"], family.name
    )
    modes = (True,) if args.checkpointing_only else (False, True)
    meta = {ckpt: mp.compute_step_memory(config, shape, lora, checkpointing=ckpt) for ckpt in modes}
    model = mp.build_transformer(config, torch.bfloat16, "cpu", lora)
    cpu = {ckpt: measure_step(model, shape, ckpt) for ckpt in modes}
    forward = measure_forward(model, shape)
    forward["computed_peak"] = mp.forward_peak(
        mp.build_transformer(config, torch.bfloat16, "meta", lora), mp.step_inputs(config, shape, "meta"), shape
    )
    del model
    gc.collect()
    blocks = block_table(block_kinds(args.family, layers, args.single_layers), cpu, meta)
    full = full_table(cpu, meta)
    build = None if args.skip_host or args.family != "sd35m" else pos_embed_build()
    host = None if args.skip_host else [host_loading(args.family, n, dtype) for n, dtype in spec["host_cases"]]
    print(f"{args.family}: {config}")
    print_blocks(blocks, shape)
    print_full(full, len(family.blocks(mp.build_transformer(config, torch.bfloat16, "meta"))))
    print(
        f"no-grad forward (a rollout step): allocator {forward['allocator_peak'] / MB:.1f}, CPU live "
        f"{forward['cpu_live_peak'] / MB:.1f}, computed {forward['computed_peak'] / MB:.1f} MB, measured/computed "
        f"{ratio(forward['allocator_peak'], forward['computed_peak']):.3f}"
    )
    if host is not None:
        print_host(build, host)
    print(
        json.dumps(
            {
                "family": args.family,
                "layers": layers,
                "single_layers": args.single_layers if args.family == "flux1-dev" else None,
                "samples": args.samples,
                "forward_batch": shape.forward_batch,
                "resolution": args.resolution,
                "image_tokens": shape.image_tokens,
                "text_tokens": shape.text_tokens,
                "blocks": blocks,
                "step": full,
                "forward": forward,
                "pos_embed_build": build,
                "host_loading": host,
            }
        )
    )


if __name__ == "__main__":
    main()
