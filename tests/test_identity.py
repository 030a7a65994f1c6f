"""Refactors change no numbers: fixed-seed runs must reproduce committed LoRA tensors and metrics bit for bit.

Each case trains a few updates from a fixed seed on one thread (the thread count alone moves the
tiny LoRA by ~3e-5), the tiny ones with a ``--resume auto`` in the middle, and compares

- every tensor of the final LoRA file, by the sha256 of its bytes, and
- every number of every ``metrics.jsonl`` row (train and eval), except wall-clock times,

with ``tests/data/identity.json``. A key that the reference lacks is allowed (new metrics);
a changed or missing one fails. After a change that is *meant* to move the numbers, rewrite
the reference and say why in the commit:

    python tests/test_identity.py --write
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import TINY_OVERRIDES, run_cli

REFERENCE = Path(__file__).parent / "data" / "identity.json"
TINY_EVAL = ["eval.every=3", "eval.num_prompts=2", "eval.batch_size=2"]

CASES: dict[str, tuple[str, list[str], bool]] = {
    # name: (preset, options, resume after update 2)
    "tiny-grpo-static": ("tiny", ["--balance", "static", *TINY_OVERRIDES, *TINY_EVAL], True),
    "tiny-grpo-apex": ("tiny", ["--balance", "apex", *TINY_OVERRIDES, *TINY_EVAL], True),
    "tiny-nft-static": ("tiny", ["--balance", "static", "train.loss=nft", *TINY_OVERRIDES, *TINY_EVAL], True),
    "tiny-nft-apex": ("tiny", ["--balance", "apex", "train.loss=nft", *TINY_OVERRIDES, *TINY_EVAL], True),
    "mini": ("mini", ["logging.progress=false", "eval.every=3", "eval.num_prompts=4", "eval.batch_size=4"], False),
}


def _apex(argv: list[str]) -> None:
    result = run_cli(argv)
    assert result.code == 0, f"apex {' '.join(argv)} failed ({result.code}):\n{result.stderr[-3000:]}"


def run_case(name: str, out: Path) -> dict:
    """Train the case into ``out`` and return its fingerprint: LoRA tensor digests and metric values."""
    preset, options, resume = CASES[name]
    base = ["train", "--preset", preset, "--out", str(out), "train.checkpoint_every=1", *options]
    if resume:
        _apex([*base, "--steps", "2"])
        _apex([*base, "--steps", "3", "--resume", "auto"])
    else:
        _apex([*base, "--steps", "3"])
    lora = load_file(str(out / "checkpoints" / "step-000003" / "pytorch_lora_weights.safetensors"))
    digests = {
        k: hashlib.sha256(v.contiguous().view(-1).numpy().tobytes()).hexdigest()[:16] for k, v in sorted(lora.items())
    }
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    metrics = [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]
    return {"lora": digests, "metrics": metrics}


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


@pytest.mark.parametrize("name", sorted(CASES))
def test_fixed_seed_runs_reproduce_the_reference_bit_for_bit(name, tmp_path):
    reference = json.loads(REFERENCE.read_text())[name]
    got = run_case(name, tmp_path / name)
    assert got["lora"] == reference["lora"], f"{name}: LoRA tensors differ from the reference"
    assert len(got["metrics"]) == len(reference["metrics"]), f"{name}: another number of metrics rows"
    for i, (row, ref) in enumerate(zip(got["metrics"], reference["metrics"])):
        changed = {k: (row.get(k, "<missing>"), v) for k, v in ref.items() if not _same(row.get(k, "<missing>"), v)}
        assert not changed, f"{name}, metrics row {i}: {changed}"


if __name__ == "__main__" and "--write" in sys.argv:
    import tempfile

    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = {name: run_case(name, Path(tmp) / name) for name in sorted(CASES)}
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    REFERENCE.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"wrote {REFERENCE} ({REFERENCE.stat().st_size} bytes)")
