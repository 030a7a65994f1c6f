"""Test helpers: the smallest training configs, in-process and subprocess CLI calls, readers of
run folders. Imported by test modules (``from helpers import ...``); ``conftest.py`` holds the
fixtures and the process-wide settings.

Every training test uses ``TINY_OVERRIDES`` on top of ``--preset tiny``: 2 prompts x 2 samples,
3 denoising steps (2 trained), 32 px images, so a step takes well under a second on a CPU.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# torch.compile (inductor) on a CPU writes C++ and builds it with g++
needs_cpp_compiler = pytest.mark.skipif(
    shutil.which("g++") is None, reason="torch.compile on a CPU needs g++ (apt install g++)"
)

# Offline, as on most training clusters: huggingface_hub and diffusers read this at import (a
# resume once failed only in offline mode), and nothing in the tests may download anyway.
os.environ["HF_HUB_OFFLINE"] = "1"

# 2 prompts x 2 samples = 4 samples per step, rolled out and trained in micro-batches of 2;
# 3 steps of which 2 are stochastic and trained; 32 px -> latent 4 x 16 x 16.
TINY_OVERRIDES = [
    "train.prompts_per_step=2",
    "train.group_size=2",
    "train.rollout_batch_size=2",
    "train.train_batch_size=2",
    "sampling.num_steps=3",
    "model.resolution=32",
    "logging.progress=false",
    "eval.every=0",  # evaluation has its own tests (test_eval.py)
]

# The models here are tiny: one intra-op thread is as fast alone and several times faster when
# the two CI cores are shared (spinning OpenMP workers of small ops fight for them).
torch.set_num_threads(1)

# Wall-clock limits in the tests only stop a hang: far above what a slow or busy machine needs
# (the slowest check here takes minutes on two loaded cores), never the thing a test checks.
HANG_GUARD_S = 1800

APEX_BIN = Path(sys.executable).parent / "apex"
"""The console script of the venv running the tests (subprocess checks of stderr/exit codes)."""


# A preset on a real-shape fixture (``apexcli.models.real_shape``) on a CPU: the preset as shipped
# but for the sizes, 128 px, 4 rollout steps, one prompt of 4 samples per update, micro-batches of
# 2 (so each update still makes its two optimizer steps), a short eval, a checkpoint every step.
REAL_SHAPE_CPU_SIZES = [
    "model.device=cpu",
    "model.resolution=128",
    "sampling.num_steps=4",
    "train.steps=2",
    "train.prompts_per_step=1",
    "train.group_size=4",
    "train.rollout_batch_size=2",
    "train.train_batch_size=2",
    "train.checkpoint_every=1",
    "eval.every=2",
    "eval.num_steps=3",
    "eval.num_prompts=2",
    "eval.batch_size=2",
    "logging.progress=false",
]

REAL_SHAPE_OBJECTIVES = "pick,aes,ocr"
"""What the real-shape runs train: the reward towers at their real widths and the real OCR."""


def real_shape_argv(preset: str, model: Path, out: Path, towers: list[str], *extra: str) -> list[str]:
    """``apex train`` arguments of ``preset`` on the real-shape pipeline saved in ``model``, with the
    CPU sizes, the towers' overrides (the ``towers`` fixture) and ``extra`` last (they win)."""
    return [
        "train",
        "--preset",
        preset,
        "--model",
        str(model),
        "--out",
        str(out),
        "--objectives",
        REAL_SHAPE_OBJECTIVES,
        *REAL_SHAPE_CPU_SIZES,
        *towers,
        *extra,
    ]


def train_real_shape(preset: str, model: Path, out: Path, towers: list[str], *extra: str) -> str:
    """``real_shape_argv`` run by the installed ``apex`` in a fresh process; fails the test on a
    non-zero exit, else returns its stderr."""
    argv = real_shape_argv(preset, model, out, towers, *extra)
    result = run_apex_subprocess(argv)
    assert result.returncode == 0, f"apex {' '.join(argv)} failed:\n{result.stderr[-4000:]}"
    return result.stderr


def tiny_overrides(**extra) -> list[str]:
    """``TINY_OVERRIDES`` plus ``key=value`` pairs (``tiny_overrides(**{"train.lr": 1e-3})``)."""
    return TINY_OVERRIDES + [f"{k}={v}" for k, v in extra.items()]


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


def run_cli(argv: list[str]) -> CliResult:
    """Run ``apex ARGV`` in this process through ``apexcli.cli.main``; SystemExit becomes a code."""
    from apexcli.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(argv))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return CliResult(code, out.getvalue(), err.getvalue())


def run_apex_subprocess(
    argv: list[str], *, env: dict | None = None, timeout: float = HANG_GUARD_S
) -> subprocess.CompletedProcess:
    """The installed ``apex`` script in a fresh process (to see exactly what a user sees)."""
    full_env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    return subprocess.run([str(APEX_BIN), *argv], capture_output=True, text=True, env=full_env, timeout=timeout)


def train_tiny(out: Path, steps: int, *extra: str, resume: str | None = None) -> Path:
    """A tiny training run in-process via the CLI entry point; fails the test on a non-zero exit."""
    argv = ["train", "--preset", "tiny", "--steps", str(steps), "--out", str(out), *TINY_OVERRIDES, *extra]
    if resume:
        argv += ["--resume", resume]
    result = run_cli(argv)
    assert result.code == 0, f"apex {' '.join(argv)} failed ({result.code}):\n{result.stderr[-3000:]}"
    return out


def read_metrics(run: Path, kind: str = "train") -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("kind", "train") == kind]


def load_lora_file(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "pytorch_lora_weights.safetensors"))


def error_line(result: CliResult) -> str:
    """The one ``error:`` line of a command that failed as a user error (exit 2, no traceback)."""
    assert result.code == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[0]


def copy_run(run: Path, dest: Path) -> Path:
    """A copy of a shared read-only run to change in one test."""
    shutil.copytree(run, dest)
    return dest


def torchrun(
    script: Path, nproc: int, args: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``script args`` on ``nproc`` local processes through ``torch.distributed.run`` (one node, a
    free port, one intra-op thread each, offline), with ``env`` added to the environment."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        str(script),
        *args,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(cmd, capture_output=True, text=True, env={**full_env, **(env or {})}, timeout=HANG_GUARD_S)
