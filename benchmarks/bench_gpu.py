"""Speed, MFU and peak memory of apex's hot paths with the REAL architectures (random weights).

    python benchmarks/bench_gpu.py                       # CUDA, SD3.5-M at the sd35m-1gpu preset
    python benchmarks/bench_gpu.py --parts compile       # torch.compile lever alone (slow warm-up)
    python benchmarks/bench_gpu.py --smoke               # CPU, tiny pipeline: same code paths

Models are built in code from their public configs, no download: the SD3.5-Medium MMDiT
(``SD35M_TRANSFORMER``, 2.24B parameters), the SD3 VAE (``SD3_VAE``), and the reward towers
PickScore (CLIP-H/14, full CLIPModel) and the aesthetic CLIP-L/14 vision tower + LAION MLP.
Everything is resident at once (as in ``apex train --preset sd35m-1gpu`` with the text
encoders freed after caching; DeQA behind ``apex serve``), so each part's peak memory is that
of the whole process during that part.

Sizes come from the preset (``--preset``, ``--set key=value``): rollout batch, training
micro-batch, steps, step window, resolution, guidance, LoRA rank. The measured work calls the
project's own functions: ``flow.rollout.rollout`` / ``decode_latents`` / ``step_log_prob``,
``train.loss.grpo_policy_loss``, ``models.lora.attach_lora``, ``PickScore.score`` /
``Aesthetic.score`` (their models are constructed here instead of ``from_pretrained``).

Parts (``--parts``, comma-separated; default all but compile):
  flops    model FLOPs per sample, counted once on meta-device twins (benchmarks/mfu.py)
  rollout  images/s of rollout + VAE decode, rollout MFU, overhead outside transformer forwards
  train    one training micro-step (policy fwd+bwd, reference fwd, loss, AdamW step): time, MFU,
           peak memory, with gradient checkpointing off and on
  rewards  images/s of PickScore (CLIP-H) and aesthetic (CLIP-L) on decoded-size images
  levers   bf16 vs fp16, SDPA vs math attention, CFG batched vs none, step window, batch size,
           scoring overlapped with sampling
  compile  model.compile (each transformer block compiled in place): warm-up and forward speed-up

MFU = model FLOPs / time / the GPU's dense bf16 peak (H100 SXM / H200: 989.4 TFLOP/s; table in
mfu.py; ``--peak-tflops`` overrides). A table is printed, then ONE JSON line (also written to
``--json-out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mfu as mfu_lib

# --------------------------------------------------------------------------- public configs
from apexcli.models.architectures import (
    CLIP_H_PROJECTION,
    CLIP_H_TEXT,
    CLIP_H_VISION,
    CLIP_L_VISION,
    CLIP_MEAN,
    CLIP_STD,
    SD3_VAE,
    SD35M_TRANSFORMER,
)

CLIP_TEXT_TOKENS = 77  # SD3's CLIP-L/CLIP-G token count, prepended to the T5 tokens

# Smoke mode: tiny towers with the same classes, and small sizes on top of the tiny preset.
SMOKE_OVERRIDES = [
    "model.device=cpu",
    "model.dtype=float32",
    "train.prompts_per_step=2",
    "train.group_size=2",
    "train.rollout_batch_size=4",
    "train.train_batch_size=2",
    "sampling.num_steps=4",
    "train.window_size=2",
]
TINY_CLIP_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    max_position_embeddings=32,
    vocab_size=128,
    hidden_act="gelu",
)
TINY_CLIP_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    hidden_act="gelu",
)


# --------------------------------------------------------------------------- timing helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, *, warmup: int = 1, repeats: int = 3) -> float:
    """Median wall seconds of ``fn()`` after ``warmup`` calls (device synchronized around each)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def count_syncs(fn, device: torch.device) -> int | None:
    """Host-device synchronizations in one call of ``fn`` (torch's sync debug mode warns on each;
    None off CUDA). Each one stalls the CPU until the GPU drains, so the next kernels are then
    launched onto an idle GPU."""
    if device.type != "cuda":
        return None
    import warnings

    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """``torch.cuda.max_memory_allocated`` since the last reset, GiB (None off CUDA)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def allocated_gib(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None


# --------------------------------------------------------------------------- the setup


@dataclass
class Bench:
    """Everything the parts share: sizes from the preset, models, inputs, results."""

    args: argparse.Namespace
    cfg: object
    device: torch.device
    dtype: torch.dtype
    gpu_name: str
    peak: float | None
    transformer_config: dict
    vae_config: dict
    text_tokens: int
    latent_hw: int
    window: list[int]
    results: dict = field(default_factory=dict)
    embeds: dict = field(default_factory=dict)
    t_start: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t_start)


def lora_kwargs(cfg) -> dict:
    return dict(
        rank=cfg.lora.rank,
        alpha=cfg.lora.alpha,
        dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        seed=cfg.seed,
        init=cfg.lora.init,
    )


def build_bench(args) -> Bench:
    from apexcli.config import resolve_config, trained_steps
    from apexcli.models.loading import DTYPES

    preset = args.preset or ("tiny" if args.smoke else "sd35m-1gpu")
    overrides = list(args.set or [])
    if args.smoke:  # small enough for a CPU test; a window of 2 of the 3 SDE steps so the lever compares something
        overrides = [*SMOKE_OVERRIDES, *overrides]
    cfg = resolve_config(preset=preset, overrides=overrides)
    if args.smoke:
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_gpu.py needs a CUDA GPU; use --smoke on a CPU")
        device = torch.device("cuda")
    dtype = DTYPES[cfg.model.dtype]
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops if args.peak_tflops else (mfu_lib.peak_tflops(gpu_name) if device.type == "cuda" else None)
    if args.smoke:
        from apexcli.models.tiny import TINY_MAX_TOKENS, build_tiny_pipeline

        pipe = build_tiny_pipeline(seed=0)
        transformer_config = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
        vae_config = {k: v for k, v in pipe.vae.config.items() if not k.startswith("_")}
        text_tokens = TINY_MAX_TOKENS + cfg.model.max_sequence_length
        vae_factor = pipe.vae_scale_factor
    else:
        transformer_config, vae_config = dict(SD35M_TRANSFORMER), dict(SD3_VAE)
        text_tokens = CLIP_TEXT_TOKENS + cfg.model.max_sequence_length
        vae_factor = 2 ** (len(SD3_VAE["block_out_channels"]) - 1)
    return Bench(
        args=args,
        cfg=cfg,
        device=device,
        dtype=dtype,
        gpu_name=gpu_name,
        peak=peak,
        transformer_config=transformer_config,
        vae_config=vae_config,
        text_tokens=text_tokens,
        latent_hw=cfg.model.resolution // vae_factor,
        window=trained_steps(cfg),
    )


def build_models(b: Bench) -> None:
    """Transformer (+LoRA), VAE, scheduler, reward models: all resident on the device."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from apexcli.models.lora import attach_lora

    t0 = time.perf_counter()
    torch.manual_seed(0)
    with mfu_lib.quiet_diffusers(), torch.device(b.device):
        b.transformer = SD3Transformer2DModel.from_config(dict(b.transformer_config)).to(b.dtype).eval()
        b.vae = AutoencoderKL.from_config(dict(b.vae_config)).to(b.dtype).eval().requires_grad_(False)
    b.lora_params = attach_lora(b.transformer, **lora_kwargs(b.cfg))
    b.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3.5's scheduler config
    b.vae_scale_factor = 2 ** (len(b.vae_config["block_out_channels"]) - 1)
    b.pick, b.aes = build_rewards(b)
    sync(b.device)
    b.results["build_s"] = time.perf_counter() - t0
    b.results["params_transformer_b"] = sum(p.numel() for p in b.transformer.parameters() if not p.requires_grad) / 1e9
    b.results["params_lora_m"] = sum(p.numel() for p in b.lora_params) / 1e6
    b.results["resident_gib"] = allocated_gib(b.device)


def clip_configs(smoke: bool):
    from transformers import CLIPConfig, CLIPVisionConfig

    if smoke:
        full = CLIPConfig(text_config=TINY_CLIP_TEXT, vision_config=TINY_CLIP_VISION, projection_dim=16)
        vision = CLIPVisionConfig(**TINY_CLIP_VISION, projection_dim=16)
    else:
        full = CLIPConfig(
            text_config=dict(CLIP_H_TEXT), vision_config=dict(CLIP_H_VISION), projection_dim=CLIP_H_PROJECTION
        )
        vision = CLIPVisionConfig(**CLIP_L_VISION)
    return full, vision


def build_rewards(b: Bench):
    """PickScore (CLIP-H) and Aesthetic (CLIP-L + LAION MLP) objects with models built in code.

    ``__init__`` is bypassed because it loads weights with ``from_pretrained``; the attributes it
    would set are set here, so ``score`` (the measured code) is the project's own.
    """
    from transformers import CLIPModel, CLIPVisionModelWithProjection

    from apexcli.models.tiny import build_char_tokenizer
    from apexcli.rewards.aes import Aesthetic, AestheticHead
    from apexcli.rewards.base import resolve_dtype
    from apexcli.rewards.clip_preprocess import ClipPreprocess
    from apexcli.rewards.pick import PickScore

    full, vision = clip_configs(b.args.smoke)
    size = full.vision_config.image_size
    pre = ClipPreprocess(shortest_edge=size, resize_hw=None, crop_hw=(size, size), mean=CLIP_MEAN, std=CLIP_STD)
    # the dtypes training loads them in: the trainer's suite is float32 unless rewards.X.dtype says otherwise
    pick_dtype = resolve_dtype(b.cfg.rewards.pick.dtype, torch.float32)
    aes_dtype = resolve_dtype(b.cfg.rewards.aes.dtype, torch.float32)
    with torch.device(b.device):
        pick_model = CLIPModel(full).to(pick_dtype).eval().requires_grad_(False)
        aes_clip = CLIPVisionModelWithProjection(vision).to(aes_dtype).eval().requires_grad_(False)
        head = AestheticHead((vision.projection_dim, 1024, 128, 64, 16, 1)).eval().requires_grad_(False)
    pick = PickScore.__new__(PickScore)
    pick.device, pick.dtype, pick.batch_size = b.device, pick_dtype, b.cfg.rewards.pick.batch_size
    pick.model, pick.preprocess = pick_model, pre
    pick.tokenizer = build_char_tokenizer(max_length=full.text_config.max_position_embeddings)
    pick.max_tokens = full.text_config.max_position_embeddings
    aes = Aesthetic.__new__(Aesthetic)
    aes.device, aes.dtype, aes.batch_size = b.device, aes_dtype, b.cfg.rewards.aes.batch_size
    aes.clip, aes.preprocess, aes.head = aes_clip, pre, head
    return pick, aes


def text_embeds(b: Bench, n: int, seed: int = 0):
    """Random stand-ins for cached prompt embeddings (float32 on the device, as the trainer keeps
    them); made once per (n, seed) so no timed region pays for them."""
    from apexcli.flow.rollout import PromptEmbeds

    key = (n, seed)
    if key not in b.embeds:
        g = torch.Generator().manual_seed(seed)
        c = b.transformer_config
        b.embeds[key] = PromptEmbeds(
            torch.randn(n, b.text_tokens, c["joint_attention_dim"], generator=g),
            torch.randn(n, c["pooled_projection_dim"], generator=g),
        ).to(b.device)
    return b.embeds[key]


def do_rollout(b: Bench, n: int, guidance: float, seed: int = 0):
    from apexcli.flow.rollout import rollout

    cond = text_embeds(b, n, seed)
    uncond = text_embeds(b, 1, 99) if guidance > 1 else None
    s = b.cfg.sampling
    return rollout(
        b.transformer,
        b.scheduler,
        cond,
        num_steps=s.num_steps,
        height=b.cfg.model.resolution,
        width=b.cfg.model.resolution,
        vae_scale_factor=b.vae_scale_factor,
        guidance_scale=guidance,
        uncond=uncond,
        sampler=s.sampler,
        noise_level=s.noise_level,
        sde_steps=b.window,
        generator=torch.Generator(b.device).manual_seed(seed),
    )


def forward_seconds(b: Bench, n: int, repeats: int = 3) -> float:
    """Median time of one no-CFG transformer forward (``predict_velocity``) on ``n`` samples."""
    from apexcli.flow.rollout import predict_velocity

    cond = text_embeds(b, n)
    x = torch.randn(n, b.transformer_config["in_channels"], b.latent_hw, b.latent_hw, device=b.device)

    def run():
        with torch.no_grad():
            predict_velocity(b.transformer, x, 0.5, cond)

    return timed(run, b.device, repeats=repeats)


# --------------------------------------------------------------------------- parts


def part_flops(b: Bench) -> dict:
    from transformers import CLIPVisionModelWithProjection

    lora = lora_kwargs(b.cfg)
    common = dict(batch=1, latent_hw=b.latent_hw, text_tokens=b.text_tokens, dtype=b.dtype, lora=lora)
    full, vision = clip_configs(b.args.smoke)
    size = full.vision_config.image_size
    pixels = lambda: torch.empty(1, 3, size, size, device="meta", dtype=b.dtype)
    from transformers import CLIPModel

    out = {
        "transformer_fwd_tflop": mfu_lib.transformer_flops(b.transformer_config, train=False, **common) / 1e12,
        "train_micro_tflop": mfu_lib.transformer_flops(b.transformer_config, train=True, **common) / 1e12,
        "vae_decode_tflop": mfu_lib.vae_decode_flops(b.vae_config, batch=1, latent_hw=b.latent_hw, dtype=b.dtype)
        / 1e12,
        "pick_image_tflop": mfu_lib.module_flops(
            lambda: CLIPModel(full).to(b.dtype), lambda m: m.get_image_features(pixel_values=pixels())
        )
        / 1e12,
        "aes_image_tflop": mfu_lib.module_flops(
            lambda: CLIPVisionModelWithProjection(vision).to(b.dtype), lambda m: m(pixel_values=pixels())
        )
        / 1e12,
    }
    b.flops = out
    return out


def part_rollout(b: Bench) -> dict:
    from apexcli.flow.rollout import decode_latents

    n, steps = b.cfg.train.rollout_batch_size, b.cfg.sampling.num_steps
    guidance = b.cfg.sampling.guidance_scale
    b.transformer.eval()
    reset_peak(b.device)
    t_roll = timed(lambda: do_rollout(b, n, guidance), b.device, repeats=b.args.repeats)
    traj = do_rollout(b, n, guidance)
    t_dec = timed(lambda: decode_latents(b.vae, traj.final), b.device, repeats=b.args.repeats)
    peak = peak_gib(b.device)
    t_fwd = forward_seconds(b, n * (2 if guidance > 1 else 1), repeats=b.args.repeats)
    syncs = count_syncs(lambda: do_rollout(b, n, guidance), b.device)
    fwd_flops = b.flops["transformer_fwd_tflop"] * 1e12 * n * (2 if guidance > 1 else 1)
    b.traj = traj
    return {
        "batch": n,
        "steps": steps,
        "cfg": guidance > 1,
        "rollout_s": t_roll,
        "decode_s": t_dec,
        "images_per_s": n / (t_roll + t_dec),
        "transformer_forward_s": t_fwd,
        "mfu": mfu_lib.mfu(fwd_flops * steps, t_roll, b.peak),
        "mfu_with_decode": mfu_lib.mfu(
            fwd_flops * steps + b.flops["vae_decode_tflop"] * 1e12 * n, t_roll + t_dec, b.peak
        ),
        "overhead_frac": max(0.0, 1.0 - steps * t_fwd / t_roll),
        "host_syncs": syncs,
        "peak_gib": peak,
    }


def make_update(b: Bench, n: int, guidance: float):
    """One optimizer update over ``n`` samples of the stored rollout at the given steps, the way
    ``Trainer._update`` runs it: per step, policy log-prob with grad, reference log-prob with the
    adapter disabled, PPO-clip + KL loss, backward; then grad clip and AdamW."""
    from apexcli.flow.rollout import step_log_prob
    from apexcli.flow.sde import gaussian_kl
    from apexcli.models.lora import adapter_layers, adapters_disabled
    from apexcli.train.loss import grpo_policy_loss

    t = b.cfg.train
    traj = b.traj.index(slice(0, n))
    cond = text_embeds(b, n)
    uncond = text_embeds(b, 1, 99) if guidance > 1 else None
    adv = torch.randn(n, generator=torch.Generator().manual_seed(3)).to(b.device)
    optimizer = torch.optim.AdamW(
        b.lora_params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay
    )
    layers = adapter_layers(b.transformer)
    sigmas = traj.sigmas.to(b.device)  # as the trainer: no host-to-device copy per step

    def update(steps: list[int]) -> torch.Tensor:
        """Returns the last ratio as a device tensor (reading it would add a host sync)."""
        ratio = None
        for i in steps:
            x, x_next = traj.latents[:, i], traj.latents[:, i + 1]
            kw = dict(guidance_scale=guidance, uncond=uncond, **traj.step_options)
            out = step_log_prob(b.transformer, x, x_next, sigmas[i], sigmas[i + 1], cond, **kw)
            with torch.no_grad(), adapters_disabled(layers):
                ref = step_log_prob(b.transformer, x, x_next, sigmas[i], sigmas[i + 1], cond, **kw)
            kl = gaussian_kl(out.mean, ref.mean, out.std)
            res = grpo_policy_loss(
                out.log_prob, traj.log_probs[:, i], adv, clip_range=t.clip_range, kl=kl, kl_beta=t.kl_beta
            )
            (res.loss / len(steps)).backward()
            ratio = res.ratio_mean
        torch.nn.utils.clip_grad_norm_(b.lora_params, t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return ratio

    return update


def part_train(b: Bench) -> dict:
    n = b.cfg.train.train_batch_size
    guidance = b.cfg.sampling.guidance_scale
    update = make_update(b, n, guidance)
    step = [b.window[0]]
    flops = b.flops["train_micro_tflop"] * 1e12 * n * (2 if guidance > 1 else 1)
    out: dict = {"batch": n}
    b.transformer.train()
    for ckpt in (False, True):
        if ckpt:
            b.transformer.enable_gradient_checkpointing()
        else:
            b.transformer.disable_gradient_checkpointing()
        reset_peak(b.device)
        seconds = timed(lambda: update(step), b.device, repeats=b.args.repeats)
        key = "ckpt" if ckpt else "no_ckpt"
        out[f"{key}_step_s"] = seconds
        out[f"{key}_mfu"] = mfu_lib.mfu(flops, seconds, b.peak)
        out[f"{key}_peak_gib"] = peak_gib(b.device)
    out["host_syncs"] = count_syncs(lambda: update(step), b.device)
    if not b.cfg.model.gradient_checkpointing:  # later parts run as the preset says
        b.transformer.disable_gradient_checkpointing()
    b.transformer.eval()
    b.update = update
    # one sd35m-1gpu iteration composed from the measured parts
    c = b.cfg.train
    samples = c.prompts_per_step * c.group_size
    micro = out["ckpt_step_s"] if b.cfg.model.gradient_checkpointing else out["no_ckpt_step_s"]
    r = b.results.get("rollout", {})
    if "rollout_s" in r:
        out["iteration_estimate_s"] = (
            samples / c.rollout_batch_size * (r["rollout_s"] + r["decode_s"]) + samples / n * len(b.window) * micro
        )
    return out


def part_rewards(b: Bench) -> dict:
    n = b.cfg.train.rollout_batch_size
    res = b.cfg.model.resolution
    images = torch.rand(n, 3, res, res, generator=torch.Generator().manual_seed(5)).to(b.device)
    prompts = [f"prompt {i // 4}" for i in range(n)]  # groups share prompts, as in training
    reset_peak(b.device)
    t_pick = timed(lambda: b.pick(images, prompts), b.device, repeats=b.args.repeats)
    t_aes = timed(lambda: b.aes(images, prompts), b.device, repeats=b.args.repeats)
    flops = (b.flops["pick_image_tflop"] + b.flops["aes_image_tflop"]) * 1e12 * n
    return {
        "batch": n,
        "pick_images_per_s": n / t_pick,
        "aes_images_per_s": n / t_aes,
        "suite_images_per_s": n / (t_pick + t_aes),
        "mfu": mfu_lib.mfu(flops, t_pick + t_aes, b.peak),
        "peak_gib": peak_gib(b.device),
    }


def _lora_back_to_fp32(b: Bench) -> None:
    for p in b.lora_params:
        p.data = p.data.float()


def part_levers(b: Bench) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from apexcli.flow.rollout import decode_latents

    out: dict = {}
    n = b.cfg.train.rollout_batch_size
    reps = b.args.repeats
    # dtype: the base weights in the other half precision (fp16 on GPU; bf16 in the CPU smoke)
    base = b.dtype
    alt = torch.float16 if b.device.type == "cuda" else torch.bfloat16
    t_base = forward_seconds(b, n, repeats=reps)
    with mfu_lib.quiet_diffusers():
        b.transformer.to(alt)
    _lora_back_to_fp32(b)
    t_alt = forward_seconds(b, n, repeats=reps)
    with mfu_lib.quiet_diffusers():
        b.transformer.to(base)
    _lora_back_to_fp32(b)
    out["dtype"] = {
        "base": str(base).replace("torch.", ""),
        "alt": str(alt).replace("torch.", ""),
        "base_forward_s": t_base,
        "alt_forward_s": t_alt,
        "alt_speedup": t_base / t_alt,
    }
    # attention: SDPA's default backend choice vs the math reference
    with sdpa_kernel([SDPBackend.MATH]):
        t_math = forward_seconds(b, n, repeats=reps)
    out["attention"] = {"sdpa_forward_s": t_base, "math_forward_s": t_math, "sdpa_speedup": t_math / t_base}
    # CFG: one batched [uncond, cond] forward per step vs no guidance
    t_cfg = timed(lambda: do_rollout(b, n, 4.5), b.device, warmup=0, repeats=1)
    t_nocfg = timed(lambda: do_rollout(b, n, 1.0), b.device, warmup=0, repeats=1)
    out["cfg"] = {"batched_cfg_rollout_s": t_cfg, "no_cfg_rollout_s": t_nocfg, "no_cfg_speedup": t_cfg / t_nocfg}
    # step window: trained steps per sample (the preset's window vs all but the last step)
    b.transformer.train()
    full = list(range(b.cfg.sampling.num_steps - 1))
    t_window = timed(lambda: b.update(b.window), b.device, warmup=0, repeats=1)
    t_full = timed(lambda: b.update(full), b.device, warmup=0, repeats=1)
    b.transformer.eval()
    out["window"] = {
        "window_steps": len(b.window),
        "window_update_s": t_window,
        "all_steps": len(full),
        "all_update_s": t_full,
        "window_speedup": t_full / t_window,
    }
    # batch size: forward throughput per sample
    sizes = [1, 2, 4] if b.args.smoke else [1, 4, 8, 16]
    out["batch"] = {str(k): k / forward_seconds(b, k, repeats=reps) for k in sizes}
    # scoring overlapped with sampling (the trainer scores micro-batch i in a thread during i+1)
    prompts = [f"prompt {i // 4}" for i in range(n)]

    def sample_and_decode(seed):
        return decode_latents(b.vae, do_rollout(b, n, 1.0, seed=seed).final)

    def score(images):
        b.pick(images, prompts)
        b.aes(images, prompts)
        sync(b.device)

    def sequential():
        for seed in (0, 1):
            score(sample_and_decode(seed))

    def overlapped():
        threads = []
        for seed in (0, 1):
            images = sample_and_decode(seed)
            th = threading.Thread(target=score, args=(images,))
            th.start()
            threads.append(th)
        for th in threads:
            th.join()

    t_seq = timed(sequential, b.device, warmup=0, repeats=1)
    t_ovl = timed(overlapped, b.device, warmup=0, repeats=1)
    out["overlap"] = {"sequential_s": t_seq, "overlapped_s": t_ovl, "overlap_speedup": t_seq / t_ovl}
    return out


def part_compile(b: Bench) -> dict:
    """``model.compile=true`` as training applies it: each transformer block compiled in place
    (regional), so this part runs last; the first compiled call pays the warm-up."""
    from apexcli.models.loading import compile_transformer_blocks

    n = b.cfg.train.rollout_batch_size
    eager = forward_seconds(b, n, repeats=b.args.repeats)
    blocks = compile_transformer_blocks(b.transformer, backend=b.args.compile_backend)
    t0 = time.perf_counter()
    forward_seconds(b, n, repeats=1)  # the first calls compile
    warmup = time.perf_counter() - t0
    t_comp = forward_seconds(b, n, repeats=b.args.repeats)
    return {
        "backend": b.args.compile_backend,
        "blocks": blocks,
        "warmup_s": warmup,
        "eager_forward_s": eager,
        "compiled_forward_s": t_comp,
        "speedup": eager / t_comp,
    }


PARTS = {
    "flops": part_flops,
    "rollout": part_rollout,
    "train": part_train,
    "rewards": part_rewards,
    "levers": part_levers,
    "compile": part_compile,
}
NEEDS = {
    "rollout": ["flops"],
    "train": ["flops", "rollout"],
    "rewards": ["flops"],
    "levers": ["flops", "rollout", "train"],
    "compile": [],
}
DEFAULT_PARTS = "flops,rollout,train,rewards,levers"


# --------------------------------------------------------------------------- report


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def print_table(report: dict) -> None:
    print(f"\n{'part':<10} {'metric':<28} value")
    print("-" * 56)
    for part, values in report.items():
        if not isinstance(values, dict):
            print(f"{'':<10} {part:<28} {_fmt(values)}")
            continue
        for key, value in values.items():
            if isinstance(value, dict):
                for k2, v2 in value.items():
                    print(f"{part:<10} {key + '.' + k2:<28} {_fmt(v2)}")
            else:
                print(f"{part:<10} {key:<28} {_fmt(value)}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="CPU, tiny pipeline and tiny reward towers (same code paths)"
    )
    parser.add_argument("--parts", default=DEFAULT_PARTS, help=f"comma-separated parts of {', '.join(PARTS)}")
    parser.add_argument(
        "--preset", default=None, help="preset giving the sizes (default sd35m-1gpu; tiny with --smoke)"
    )
    parser.add_argument(
        "--set", action="append", help="config override key=value (repeatable), e.g. train.rollout_batch_size=16"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median)")
    parser.add_argument(
        "--budget-s", type=float, default=420.0, help="skip the remaining parts once this many seconds have passed"
    )
    parser.add_argument(
        "--compile-backend", default=None, help="torch.compile backend (default inductor; eager with --smoke)"
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's dense bf16 peak (TFLOP/s)")
    parser.add_argument("--json-out", default=None, help="also write the JSON line to this file")
    args = parser.parse_args(argv)
    if args.compile_backend is None:
        args.compile_backend = "eager" if args.smoke else "inductor"
    import transformers

    transformers.logging.set_verbosity_error()
    wanted = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in wanted if p not in PARTS]
    if unknown:
        raise SystemExit(f"unknown part(s) {unknown}; valid: {', '.join(PARTS)}")
    order = [p for p in PARTS if p in wanted or any(p in NEEDS.get(w, []) for w in wanted)]

    b = build_bench(args)
    build_models(b)
    for part in order:
        if b.left() <= 0:
            b.results[part] = {"skipped": "budget"}
            continue
        t0 = time.perf_counter()
        b.results[part] = PARTS[part](b)
        b.results[part]["part_s"] = time.perf_counter() - t0
        # a line per finished part, so a run stopped by its timeout still leaves its numbers
        print(f"[bench_gpu] {part}: {json.dumps(b.results[part])}", flush=True)
    report = {
        "bench": "bench_gpu",
        "smoke": args.smoke,
        "device": b.gpu_name,
        "torch": torch.__version__,
        "dtype": str(b.dtype).replace("torch.", ""),
        "peak_tflops": b.peak,
        "preset": b.cfg.preset,
        "resolution": b.cfg.model.resolution,
        "window": b.window,
        **b.results,
        "wall_s": time.perf_counter() - b.t_start,
    }
    print_table(report)
    line = json.dumps(report, sort_keys=False)
    print(line)
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as fh:
            fh.write(line + "\n")
    return report


if __name__ == "__main__":
    main()
