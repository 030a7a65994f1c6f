"""The flux1-dev presets carry Flow-GRPO's FLUX.1 recipe, value by value.

The reference values are Flow-GRPO's ``pickscore_flux`` config (config/grpo.py, 32 GPUs) and what
``scripts/train_flux.py`` hard-codes (LoRA, T5 length, EMA), as docs/method/flow-grpo-parity.md
("FLUX.1") states them, in apex's keys. The step math behind them is compared with Flow-GRPO's own
functions by tests/test_flow_grpo_parity.py (opt-in).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

import apexcli.config as config_module
from apexcli.config import resolve_config, trained_steps
from apexcli.models.lora import attach_lora
from apexcli.models.tiny_flux import build_tiny_flux_pipeline
from apexcli.train.losses.grpo import GrpoLoss

# pickscore_flux: 32 GPUs x 3 samples per batch, 24 images per prompt, 48 prompts per epoch
GPUS, PER_GPU_BATCH, GROUP, PROMPTS = 32, 3, 24, 48
NUM_BATCHES = int(PROMPTS / (GPUS * PER_GPU_BATCH / GROUP))  # config.sample.num_batches_per_epoch: 12
ACCUMULATION = NUM_BATCHES // 2  # config.train.gradient_accumulation_steps: 6

FLOW_GRPO_FLUX = {
    "model.resolution": 512,
    "model.dtype": "bfloat16",  # mixed_precision "bf16"
    "model.max_sequence_length": 128,  # train_flux.py's compute_text_embeddings
    "sampling.num_steps": 6,
    "sampling.guidance_scale": 3.5,
    "sampling.sampler": "sde",  # train_flux.py steps with sd3_sde_with_logprob's plain SDE
    "sampling.noise_level": 0.9,
    "sampling.share_group_noise": False,  # same_latent False
    "eval.num_steps": 28,
    "eval.guidance_scale": 3.5,  # its eval samples with sample.guidance_scale
    "eval.use_ema": True,  # its eval copies the EMA weights in
    "train.group_size": GROUP,
    "train.prompts_per_step": PROMPTS,
    "train.rollout_batch_size": PER_GPU_BATCH,
    "train.train_batch_size": PER_GPU_BATCH,  # train.batch_size = sample.train_batch_size
    "train.inner_epochs": 1,
    "train.optimizer_steps_per_epoch": NUM_BATCHES // ACCUMULATION,  # 2
    "train.timestep_fraction": 0.99,
    "train.kl_beta": 0.0,
    "train.lr": 3e-4,
    "train.clip_range": 1e-4,
    "train.adv_clip": 5.0,
    "train.max_grad_norm": 1.0,
    "train.weight_decay": 1e-4,
    "train.adam_beta1": 0.9,
    "train.adam_beta2": 0.999,
    "train.adam_eps": 1e-8,
    "train.ema_decay": 0.9,  # EMAModuleWrapper(decay=0.9, update_step_interval=8), warm-up built in
    "train.ema_every": 8,
    "train.ema_warmup": True,
    "balance.std_scope": "global",  # sample.global_std True
    "lora.rank": 64,
    "lora.alpha": 128,
    "lora.init": "gaussian",
}
FLOW_GRPO_FLUX_LORA_TARGETS = [
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
]


def _get(cfg, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _flat(obj, prefix: str = "") -> dict:
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_flat(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out


@pytest.mark.parametrize("key", sorted(FLOW_GRPO_FLUX))
def test_flux1_dev_is_flow_grpos_flux_recipe(key):
    assert _get(resolve_config(preset="flux1-dev"), key) == FLOW_GRPO_FLUX[key]


def test_flux1_dev_trains_the_same_steps_as_flow_grpo():
    """Flow-GRPO trains ``int(6 * 0.99) = 5`` steps, 0..4, of every sample; apex's window is all
    but the last step, and timestep_fraction 0.99 of its 5 steps rounds up to all 5."""
    cfg = resolve_config(preset="flux1-dev")
    assert trained_steps(cfg) == list(range(int(6 * 0.99)))
    assert GrpoLoss(cfg, None, trained_steps(cfg)).points_per_sample == int(6 * 0.99) == 5
    # its layout: 1152 samples an epoch, 2 optimizer steps of 576 each
    assert GPUS * PER_GPU_BATCH * NUM_BATCHES == GROUP * PROMPTS == 1152
    assert math.isclose(NUM_BATCHES / ACCUMULATION, cfg.train.optimizer_steps_per_epoch)


def test_flux1_dev_adapts_flow_grpos_modules_on_a_flux_transformer():
    cfg = resolve_config(preset="flux1-dev")
    assert sorted(cfg.lora.target_modules) == sorted(FLOW_GRPO_FLUX_LORA_TARGETS)
    transformer = build_tiny_flux_pipeline().transformer
    attach_lora(
        transformer, rank=4, alpha=8, dropout=0.0, seed=0, init="gaussian", target_modules=cfg.lora.target_modules
    )
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in transformer.named_parameters() if ".lora_A." in n}
    for target in cfg.lora.target_modules:  # each name matches a module: no typo adapts nothing
        assert any(name.endswith("." + target) for name in adapted), target
    # both streams' feed-forward layers of the double-stream blocks, as train_flux.py adapts them
    assert "transformer_blocks.0.ff.net.2" in adapted and "transformer_blocks.0.ff_context.net.0.proj" in adapted


def test_flux1_dev_1gpu_holds_only_its_one_gpu_differences():
    text = (Path(config_module.__file__).parent / "presets" / "flux1-dev-1gpu.yaml").read_text(encoding="utf-8")
    assert "\nbase: flux1-dev\n" in text
    base, one = _flat(resolve_config(preset="flux1-dev")), _flat(resolve_config(preset="flux1-dev-1gpu"))
    changed = {k for k in base if base[k] != one[k]} - {"out", "preset", "name"}
    assert changed == {
        "model.device",
        "model.gradient_checkpointing",
        "train.steps",
        "train.prompts_per_step",
        "train.group_size",
        "train.rollout_batch_size",
        "train.train_batch_size",
        "train.window_size",
        "eval.num_prompts",
        "eval.batch_size",
    }
    cfg = resolve_config(preset="flux1-dev-1gpu")
    assert cfg.model.free_text_encoders and trained_steps(cfg) == [0, 1, 2]


def test_a_flux_model_given_the_sd3_defaults_is_warned_once_with_its_recipe(capsys):
    """A FLUX model trained from the defaults (the SD3 recipe) names each setting that still holds
    SD3's value and the preset with FLUX's; a FLUX preset, or a value the user chose, is quiet."""
    from apexcli.backbones import BACKBONES
    from apexcli.recipes import foreign_recipe_settings
    from apexcli.train.setup import _warn_foreign_recipe

    sd3, flux = BACKBONES
    defaults = resolve_config(overrides=["model.pretrained=/models/flux1-dev"])
    found = foreign_recipe_settings(defaults, flux)
    assert "sampling.num_steps=10 (flux1-dev: 6)" in found and "train.kl_beta=0.04 (flux1-dev: 0)" in found
    assert foreign_recipe_settings(resolve_config(preset="flux1-dev-1gpu"), flux) == []
    assert foreign_recipe_settings(resolve_config(preset="sd35m-1gpu"), sd3) == []
    chosen = resolve_config(preset="flux1-dev", overrides=["sampling.num_steps=8"])  # neither recipe's: the user's
    assert foreign_recipe_settings(chosen, flux) == []
    # one value of the other recipe among its own is a choice (6 steps for SD3), not left-over defaults
    assert foreign_recipe_settings(resolve_config(overrides=["sampling.num_steps=6"]), sd3) == []
    assert foreign_recipe_settings(resolve_config(preset="flux1-dev", overrides=["sampling.num_steps=10"]), flux) == []
    _warn_foreign_recipe(defaults, flux, main_process=True)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sampling.noise_level=0.7 (flux1-dev: 0.9)" in err[0] and "--preset flux1-dev" in err[0]
    _warn_foreign_recipe(resolve_config(preset="tiny-flux"), flux, main_process=True)  # built in: no recipe
    _warn_foreign_recipe(defaults, flux, main_process=False)
    assert capsys.readouterr().err == ""


def test_a_saved_flux_model_sampled_from_the_defaults_is_warned(tmp_path):
    """``apex sample --model DIR`` with no preset, config or run: the SD3 defaults' steps and
    guidance on a FLUX model are named with FLUX's own; an explicit --guidance 3.5 is quiet."""
    from helpers import run_cli

    build_tiny_flux_pipeline(seed=0).save_pretrained(tmp_path / "flux")
    argv = [
        "sample",
        "--model",
        str(tmp_path / "flux"),
        "--prompt",
        "a cat",
        "--size",
        "32",
        "--device",
        "cpu",
        "model.dtype=float32",
        "model.max_sequence_length=16",
    ]
    result = run_cli([*argv, "--steps", "2", "--out", str(tmp_path / "a")])
    assert result.code == 0, result.stderr[-2000:]
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("warning:")]
    assert "eval.guidance_scale=4.5 (flux1-dev: 3.5)" in line and "--preset flux1-dev" in line
    result = run_cli([*argv, "--steps", "28", "--guidance", "3.5", "--out", str(tmp_path / "b")])
    assert result.code == 0 and "warning:" not in result.stderr
