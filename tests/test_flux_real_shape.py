"""Both FLUX.1-dev presets end to end on the real-shape FLUX.1-dev fixture (published widths,
1 double- + 1 single-stream block, random weights), as ``test_real_shape.py`` runs every SD3.5
preset.

The fixture (``apexcli.models.real_shape``) keeps FLUX.1-dev's 3072-wide blocks of 24 x 128
heads, rotary axes, 64 packed input channels, guidance embedding, VAE, T5-XXL and CLIP-L at their
real widths and the tokenizers' real lengths; it is saved in diffusers' layout and loaded through
``model.pretrained=DIR``, the path of the released weights. The presets run as shipped (bf16)
except for the CPU sizes of ``helpers.REAL_SHAPE_CPU_SIZES``; the objectives are ``pick,aes,ocr``
with the real-width reward towers of the ``towers`` fixture and the real OCR. What each preset
says about the text cache, the encoders, KL and EMA is read from the preset, so these checks
follow the recipe wherever it goes.

Minutes on two cores: marked slow (``make test-all``).
"""

from __future__ import annotations

import gc
import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file

from apexcli.config import Config, ModelConfig, resolve_config
from apexcli.flow.rollout import latent_channels, predict_velocity
from apexcli.models.loading import load_pipeline
from apexcli.models.text_cache import encode_prompts
from apexcli.runs import LORA_FILE
from apexcli.train.layout import optimizer_steps_per_update
from helpers import (
    REAL_SHAPE_CPU_SIZES,
    REAL_SHAPE_OBJECTIVES,
    read_metrics,
    real_shape_argv,
    run_apex_subprocess,
    train_real_shape,
)

pytestmark = pytest.mark.slow

# The trained modules of a double-stream block (image and text attention) and of a single-stream one
DOUBLE = "transformer.transformer_blocks.0."
SINGLE = "transformer.single_transformer_blocks.0."


@pytest.fixture(scope="module")
def flux(tmp_path_factory) -> Path:
    """The real-shape FLUX.1-dev pipeline saved with ``save_pretrained`` (safetensors)."""
    from apexcli.models.real_shape import save_real_shape_flux

    return save_real_shape_flux(tmp_path_factory.mktemp("flux") / "pipe")


def _config(preset: str, model: Path, out: Path, towers: list[str], *extra: str):
    """The config ``apex train`` resolves from ``real_shape_argv`` (the same layers, in process)."""
    return resolve_config(
        preset=preset,
        options={"out": str(out), "objectives": REAL_SHAPE_OBJECTIVES.split(","), "model": {"pretrained": str(model)}},
        overrides=[*REAL_SHAPE_CPU_SIZES, *towers, *extra],
    )


def _lora(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / LORA_FILE))


def _check_trained(rows: list[dict], cfg: Config) -> None:
    """Every update on-policy at its first micro-step, finite, and moving the LoRA."""
    assert [r["optimizer_steps"] for r in rows] == [optimizer_steps_per_update(cfg, 1)] * cfg.train.steps
    assert all(r["ratio_first"] == 1.0 for r in rows)  # the recompute equals the rollout, bf16 included
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("loss", "grad_norm", "ratio_mean", "ratio_max_dev")), r
        assert r["grad_norm"] > 0 and r["skipped_updates"] == 0
        assert math.isfinite(r["reward/pick/mean"]) and math.isfinite(r["reward/aes/mean"])
        if cfg.train.kl_beta > 0:  # against the LoRA-disabled reference
            assert math.isfinite(r["kl"])
    if cfg.train.kl_beta > 0:
        assert rows[-1]["kl"] > 0  # the policy has left the reference by the last update


def _check_lora(lora: dict[str, torch.Tensor], rank: int) -> None:
    """Both block kinds adapted at FLUX.1-dev's width, and every adapter's B moved off its zero init."""
    assert lora[DOUBLE + "attn.to_q.lora_A.weight"].shape == (rank, 3072)
    assert lora[DOUBLE + "attn.add_q_proj.lora_A.weight"].shape == (rank, 3072)
    assert lora[SINGLE + "attn.to_q.lora_A.weight"].shape == (rank, 3072)
    b = {k: v for k, v in lora.items() if k.endswith("lora_B.weight")}
    assert any(k.startswith(SINGLE) for k in b) and any(k.startswith(DOUBLE) for k in b)
    assert all(v.abs().max() > 0 for v in b.values()), [k for k, v in b.items() if v.abs().max() == 0]


def test_real_shape_flux_loads_encodes_and_predicts(flux):
    pipe = load_pipeline(ModelConfig(pretrained=str(flux), dtype="bfloat16", local_files_only=True))
    assert isinstance(pipe, FluxPipeline) and pipe.vae_scale_factor == 8
    assert pipe.transformer.config.guidance_embeds and latent_channels(pipe.transformer) == 16
    cond = encode_prompts(pipe, ["a red apple"], max_sequence_length=128, device="cpu")
    assert cond.prompt_embeds.shape == (1, 128, 4096) and cond.pooled.shape == (1, 768)
    x = torch.randn(1, 16, 32, 32)  # 256 px: 256 packed tokens
    v = predict_velocity(pipe.transformer, x, 0.5, cond, guidance_scale=3.5)
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()


@pytest.fixture(scope="module")
def straight(flux, towers, tmp_path_factory) -> tuple[Path, Config, dict]:
    """flux1-dev-1gpu run straight through in this process (the CLI's config and Trainer), so the
    pipeline the trainer holds can be read: the run, its config and what was seen after setup."""
    from apexcli.train.trainer import Trainer

    out = tmp_path_factory.mktemp("flux1gpu") / "run"
    cache = out.parent / "text_cache"
    cfg = _config("flux1-dev-1gpu", flux, out, towers, f"model.text_cache_dir={cache}")
    trainer = Trainer(cfg, argv=["apex", *real_shape_argv("flux1-dev-1gpu", flux, out, towers)])
    try:
        trainer.setup()
        seen = {
            "encoders": [getattr(trainer.pipe, a) is not None for a in ("text_encoder", "text_encoder_2")],
            "cached": len(list(cache.glob("*.safetensors"))),
            "checkpointing": trainer.pipe.transformer.gradient_checkpointing,
        }
        trainer.train()
    finally:
        trainer.close()
    del trainer
    gc.collect()
    return out, cfg, seen


def test_flux1_dev_1gpu_runs_end_to_end(straight):
    out, cfg, seen = straight
    assert cfg.model.dtype == "bfloat16"
    # the encoders are freed where the preset says so, once every prompt is in the cache
    assert seen["encoders"] == [not cfg.model.free_text_encoders] * 2
    assert seen["cached"] > 0 and seen["checkpointing"] == cfg.model.gradient_checkpointing
    rows = read_metrics(out)
    _check_trained(rows, cfg)
    assert all(r["ratio_max_dev"] > 0 for r in rows)  # the second optimizer step sees the first one's LoRA
    evals = read_metrics(out, "eval")
    assert [r["step"] for r in evals] == [0, 2] and (out / "eval" / "step-000002" / "grid.png").is_file()
    assert all(math.isfinite(r["eval/pick/mean"]) for r in evals)
    final = out / "checkpoints" / "step-000002"
    _check_lora(_lora(final), cfg.lora.rank)
    assert (final / "ema").is_dir() == (cfg.train.ema_decay > 0)


def test_flux1_dev_1gpu_resumes_bit_for_bit(straight, flux, towers, tmp_path):
    """Half the run, then ``--resume auto``: the same LoRA (and EMA) as the run straight through."""
    out, cfg, _ = straight
    half = tmp_path / "run"
    cache = f"model.text_cache_dir={out.parent / 'text_cache'}"
    train_real_shape("flux1-dev-1gpu", flux, half, towers, cache, "train.steps=1")
    err = train_real_shape("flux1-dev-1gpu", flux, half, towers, cache, "--resume", "auto")
    assert "resumed from" in err and "step 1" in err
    assert [r["step"] for r in read_metrics(half)] == [1, 2]  # the step count goes on
    for sub in ("", "ema"):
        if sub and cfg.train.ema_decay == 0:
            continue
        a = _lora(out / "checkpoints" / "step-000002" / sub)
        b = _lora(half / "checkpoints" / "step-000002" / sub)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub or "live"
    untimed = lambda row: {k: v for k, v in row.items() if not k.startswith("time/")}
    assert untimed(read_metrics(half)[-1]) == untimed(read_metrics(out)[-1])  # rewards, balancer, losses


def test_a_stock_flux_pipeline_loads_the_trained_lora(straight, flux):
    out, _, _ = straight
    checkpoint = out / "checkpoints" / "step-000002"
    pipe = FluxPipeline.from_pretrained(str(flux), torch_dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    call = dict(  # the transformer call of FluxPipeline at 64 px: 4 x 4 packed tokens, 8 text tokens
        hidden_states=torch.randn(1, 16, 64, generator=g).to(torch.bfloat16),
        encoder_hidden_states=torch.randn(1, 8, 4096, generator=g).to(torch.bfloat16),
        pooled_projections=torch.randn(1, 768, generator=g).to(torch.bfloat16),
        timestep=torch.tensor([0.5]),
        guidance=torch.tensor([3.5]),
        txt_ids=torch.zeros(8, 3),
        img_ids=FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.bfloat16),
        return_dict=False,
    )
    with torch.no_grad():
        base = pipe.transformer(**call)[0]
        pipe.load_lora_weights(str(checkpoint), weight_name=LORA_FILE)
        tuned = pipe.transformer(**call)[0]
    adapted = [n for n, m in pipe.transformer.named_modules() if "default_0" in getattr(m, "lora_A", {})]
    lora = _lora(checkpoint)
    assert len(adapted) == sum(k.endswith("lora_A.weight") for k in lora)  # every key found its layer
    assert any(n.startswith("single_transformer_blocks.") for n in adapted)
    assert (tuned.float() - base.float()).abs().max() > 0


def test_apex_sample_runs_the_trained_lora(straight, flux, tmp_path):
    """``apex sample --lora RUN`` with the run's config (its model directory and FLUX guidance)."""
    out, cfg, _ = straight
    images = {}
    for name, lora in (("base", []), ("tuned", ["--lora", str(out)])):
        samples = tmp_path / name
        argv = ["sample", "--config", str(out / "config.yaml"), "--model", str(flux), *lora]
        argv += ["--prompt", 'a sign that says "HI"', "--size", "128", "--steps", "2", "--device", "cpu"]
        result = run_apex_subprocess([*argv, "--out", str(samples)])
        assert result.returncode == 0, result.stderr[-3000:]
        meta = [json.loads(line) for line in (samples / "metadata.jsonl").read_text().splitlines()]
        assert len(meta) == 1 and meta[0]["guidance"] == cfg.eval.guidance_scale
        assert meta[0]["lora"] == (str(out / "checkpoints" / "step-000002") if lora else None)
        images[name] = (samples / meta[0]["file"]).read_bytes()
    assert images["base"] != images["tuned"]


def test_flux1_dev_runs_end_to_end(flux, towers, tmp_path):
    """The many-GPU preset in one process; the eval prompts ask for text, so the real OCR scores
    FLUX.1's images too."""
    out = tmp_path / "run"
    extra = ("prompts.eval=builtin:ocr_eval",)
    err = train_real_shape("flux1-dev", flux, out, towers, *extra)
    assert "apex: one process; 4 samples per update" in err
    cfg = _config("flux1-dev", flux, out, towers, *extra)
    _check_trained(read_metrics(out), cfg)
    evals = read_metrics(out, "eval")
    assert [r["step"] for r in evals] == [0, 2]
    assert all(math.isfinite(r["eval/ocr/mean"]) and math.isfinite(r["eval/pick/mean"]) for r in evals)
    _check_lora(_lora(out / "checkpoints" / "step-000002"), cfg.lora.rank)
