"""Every speed switch keeps the on-policy invariant: on the first update (before any optimizer
step) the recomputed log-prob equals the rollout's, so ratio == 1 on the first micro-batch
(``ratio_first``) and on every micro-batch of the step (``ratio_mean``).

Each case is a 1-step tiny training run through the CLI (``helpers.TINY_OVERRIDES``: 2 prompts
x 2 samples, 3 steps, 32 px). Switches that must not change the numbers at all (gradient
checkpointing, the text-embedding cache with the encoders freed) are also compared with the
plain run. The last tests cover the GPU benchmark's helpers and its CPU smoke mode.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch

from helpers import needs_cpp_compiler, read_metrics, train_tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

SWITCHES = {
    "cfg_batched": ["sampling.guidance_scale=4.5"],
    "step_window": ["train.window_size=2", "sampling.num_steps=4"],
    "late_window": ["train.window_start=1", "train.window_size=1", "sampling.num_steps=4"],
    "rollout_1_train_4": ["train.rollout_batch_size=1", "train.train_batch_size=4"],
    "cps_sampler": ["sampling.sampler=cps"],
    # bf16 base weights (the GPU presets' dtype) with the LoRA kept in float32
    "bf16": ["model.dtype=bfloat16"],
    # torch.compile of the transformer (inductor; on CPU it needs a C compiler, as the CI has)
    "compiled": ["model.compile=true"],
    "sd35m_1gpu_recipe": [
        "model.gradient_checkpointing=true",
        "train.window_size=2",
        "sampling.num_steps=4",
        "train.train_batch_size=1",
        "model.free_text_encoders=true",
        "sampling.guidance_scale=4.5",
        "train.kl_form=reference",
        "lora.init=gaussian",
    ],
}


def _first_row(out: Path, *extra: str) -> dict:
    rows = read_metrics(train_tiny(out, 1, *extra))
    assert len(rows) == 1
    return rows[0]


@pytest.fixture(scope="module")
def plain_row(tmp_path_factory) -> dict:
    """The reference 1-step run with no switch (no CFG, window = all but the last step)."""
    return _first_row(tmp_path_factory.mktemp("plain") / "run")


def test_plain_run_is_on_policy(plain_row):
    assert abs(plain_row["ratio_first"] - 1) < 1e-5
    assert abs(plain_row["ratio_mean"] - 1) < 1e-5
    assert plain_row["clip_frac"] == 0.0


# the compiled run builds C++ for minutes on a CPU: `make test-all` (marker slow) runs it
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[needs_cpp_compiler, pytest.mark.slow]) if n == "compiled" else n for n in SWITCHES]
)
def test_switch_keeps_ratio_one(tmp_path, name):
    row = _first_row(tmp_path / "run", *SWITCHES[name])
    assert abs(row["ratio_first"] - 1) < 1e-5, f"{name}: ratio_first={row['ratio_first']}"
    assert abs(row["ratio_mean"] - 1) < 1e-5, f"{name}: ratio_mean={row['ratio_mean']}"
    assert row["clip_frac"] == 0.0
    assert math.isfinite(row["loss"]) and row["grad_norm"] > 0


def test_gradient_checkpointing_changes_no_number(tmp_path, plain_row):
    """Recomputing activations in the backward pass is exact: same rewards, loss and gradient norm."""
    row = _first_row(tmp_path / "run", "model.gradient_checkpointing=true")
    assert abs(row["ratio_first"] - 1) < 1e-5 and abs(row["ratio_mean"] - 1) < 1e-5
    for key in ("reward/brightness/mean", "reward/colorfulness/mean", "loss"):
        assert row[key] == pytest.approx(plain_row[key], rel=1e-6, abs=1e-9), key
    assert row["grad_norm"] == pytest.approx(plain_row["grad_norm"], rel=1e-4)


def test_text_cache_with_freed_encoders_changes_no_number(tmp_path, plain_row):
    """Cached embeddings (written, then read back by a second run with the encoders freed) give
    the same samples as fresh encoding, and the ratio stays 1."""
    cache = tmp_path / "text_cache"
    switch = [f"model.text_cache_dir={cache}", "model.free_text_encoders=true"]
    first = _first_row(tmp_path / "first", *switch)
    entries = sorted(os.listdir(cache))
    assert entries and all(e.endswith(".safetensors") for e in entries)
    second = _first_row(tmp_path / "second", *switch)  # every prompt now a cache hit
    assert sorted(os.listdir(cache)) == entries
    for row in (first, second):
        assert abs(row["ratio_first"] - 1) < 1e-5
        for key in ("reward/brightness/mean", "reward/colorfulness/mean"):
            assert row[key] == pytest.approx(plain_row[key], rel=1e-6), key


# --------------------------------------------------------------------------- benchmark helpers


def test_peak_table_matches_gpu_names():
    from mfu import peak_tflops

    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_tflops("NVIDIA H200") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("Some Future GPU") is None


def test_flop_count_and_mfu_by_hand():
    from mfu import count_flops, mfu, module_flops

    lin = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8)
    assert count_flops(lambda: lin(x)) == 2 * 3 * 8 * 4  # one [3,8] x [8,4] matmul
    # the same count on a meta-device twin (how bench_gpu counts the real architectures)
    assert module_flops(lambda: torch.nn.Linear(8, 4), lambda m: m(torch.empty(3, 8, device="meta"))) == 192
    assert mfu(494.7e12, 1.0, 989.4) == pytest.approx(0.5)
    assert mfu(1e12, 0.0, 989.4) is None and mfu(1e12, 1.0, None) is None


def test_lora_flops_on_the_sd3_twin_are_the_forward_plus_backward():
    """Training FLOPs = policy forward + backward (no weight grads for frozen layers) + the
    adapter-free reference forward: strictly between 2x and 4x the forward."""
    from apexcli.models.tiny import build_tiny_pipeline
    from mfu import transformer_flops

    config = {k: v for k, v in build_tiny_pipeline().transformer.config.items() if not k.startswith("_")}
    lora = dict(rank=4, alpha=8, dropout=0.0, target_modules=["attn.to_q", "attn.to_v"], seed=0)
    kw = dict(batch=1, latent_hw=16, text_tokens=64, dtype=torch.float32, lora=lora)
    fwd = transformer_flops(config, train=False, **kw)
    train = transformer_flops(config, train=True, **kw)
    assert fwd > 0 and 2 * fwd < train < 4 * fwd
    assert transformer_flops(config, train=False, **{**kw, "batch": 2}) == 2 * fwd


def test_bench_gpu_smoke_runs_the_measured_paths(tmp_path):
    import json

    from bench_gpu import main

    out = tmp_path / "bench.json"
    report = main(["--smoke", "--repeats", "1", "--parts", "rollout,train", "--json-out", str(out)])
    assert json.loads(out.read_text())["rollout"]["batch"] == report["rollout"]["batch"] == 4
    assert report["flops"]["transformer_fwd_tflop"] > 0
    assert report["rollout"]["images_per_s"] > 0 and report["rollout"]["mfu"] is None  # no peak on CPU
    assert report["train"]["no_ckpt_step_s"] > 0 and report["train"]["ckpt_step_s"] > 0
    assert report["window"] == [0, 1]
