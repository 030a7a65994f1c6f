"""``benchmarks/gpu_check.sh --cpu``: the GPU check rehearsed on a CPU at toy sizes, so the one
script a GPU machine runs cannot rot between GPU runs (about two minutes on two cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
PARTS = {"tests", "bench", "trainer", "flux", "flux_dev", "compile"}
BENCH_KEYS = {
    "bench",
    "smoke",
    "device",
    "torch",
    "dtype",
    "preset",
    "resolution",
    "window",
    "build_s",
    "flops",
    "rollout",
    "train",
    "rewards",
    "levers",
    "wall_s",
}


def run_check(*args: str, out: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "OUT": str(out),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)


def test_unknown_argument_is_a_one_line_error(tmp_path):
    proc = run_check("--gpu", out=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["gpu_check.sh: unknown argument '--gpu' (--cpu, --out DIR)"]


@pytest.mark.slow
def test_cpu_rehearsal_runs_every_part(tmp_path):
    out = tmp_path / "out"
    proc = run_check("--cpu", out=out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "cpu"
    assert set(summary["parts"]) == PARTS
    assert all(part["rc"] == 0 for part in summary["parts"].values()), summary["parts"]
    assert sum(part["timeout_s"] for part in summary["parts"].values()) < 570
    assert proc.stdout.strip().splitlines()[-1] == summary["line"]

    # the CUDA tests were collected and skipped, and say so: none counts as passed
    tests = summary["cuda_tests"]
    assert tests["collected"] > 0
    assert tests["skipped"] == tests["collected"] and tests["passed"] == tests["failed"] == 0
    assert f"{tests['collected']} skipped" in summary["line"]

    bench = json.loads((out / "bench_gpu.json").read_text())
    assert BENCH_KEYS <= set(bench) and bench["smoke"] is True and bench["device"] == "cpu"
    assert not any(isinstance(v, dict) and "skipped" in v for v in bench.values())
    compiled = json.loads((out / "bench_compile.json").read_text())
    assert compiled["compile"]["blocks"] > 0

    # bench_train's JSON: the real-shape fixture at depth 1, no CUDA peak, the plan beside it
    trainer = summary["trainer"]
    assert trainer["arch"] == "sd35m" and trainer["layers"] == 1 and trainer["device"] == "cpu"
    assert (
        trainer["peak_gib"] is None
        and trainer["memory_plan_gib"]["total"] > trainer["memory_plan_gib"]["transformer"] > 0
    )
    # the same on FLUX.1-dev's fixture for both FLUX presets, both block kinds present, with their plans
    for key, preset in (("flux_trainer", "flux1-dev-1gpu"), ("flux_dev_trainer", "flux1-dev")):
        flux = summary[key]
        assert flux["arch"] == "flux1-dev" and flux["preset"] == preset and flux["device"] == "cpu"
        assert flux["transformer_blocks"] == {"num_layers": 1, "num_single_layers": 2}
        assert flux["peak_gib"] is None and flux["step_s"] > 0 and flux["phases_s"]["train"] > 0
        plan = flux["memory_plan_gib"]
        assert flux["memory_plan_error"] is None and plan["total"] > plan["transformer"] > 0
    # flux1-dev's LoRA (r=64 on attention and feed-forward) is the 1-GPU preset's: the same plan rows
    assert summary["flux_dev_trainer"]["memory_plan_gib"]["lora_weights"] == plan["lora_weights"]
    assert len(list(out.iterdir())) <= 8  # what the GPU machine's tool brings back


def test_trainer_plan_is_the_published_model_at_full_depth():
    """The plan the GPU check reads the trainer's peak against: the released transformer (every
    block as published, dual attention in 0-12) with its position table, in bf16."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from apexcli.config import resolve_config
    from apexcli.models.architectures import SD35M_TRANSFORMER
    from apexcli.models.real_shape import real_shape_transformer_config
    from memory_plan import trainer_plan

    full = real_shape_transformer_config("sd35m", 24)
    assert full == dict(SD35M_TRANSFORMER)
    assert real_shape_transformer_config("sd35m", 2)["dual_attention_layers"] == (0,)
    plan = trainer_plan(resolve_config(preset="sd35m-1gpu"), full)
    position_table = 384 * 384 * 1536
    assert plan["transformer"] + plan["pos_embed"] == (2_243_171_520 + position_table) * 2
    assert plan["total"] == sum(v for k, v in plan.items() if k != "total")
    assert 1e9 < plan["activations_train"] < 2.5e9  # checkpointed micro-step peak (docs/memory.md: 1.63 GB)
