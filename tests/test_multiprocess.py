"""Two CPU processes under torchrun (gloo) against the one-process run of the same config.

``accelerate launch --cpu --num_processes 2`` starts only one process here (DESIGN §6), so the
test uses ``torchrun``. Only rank 0 saves checkpoints; to see every rank's weights the test
runs the real CLI through a small launcher that, when training ends, has each rank dump its own
LoRA (a wrapper around ``Trainer.close`` in the test's own process; nothing in apex changes).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import TINY_OVERRIDES, load_lora_file, read_metrics, torchrun

# two-process training under torchrun takes minutes on two CPU cores: `make test-all` runs it
pytestmark = pytest.mark.slow

LAUNCHER = """
import sys
from safetensors.torch import save_file
from apexcli.models.lora import lora_state_dict
from apexcli.train import trainer as trainer_module

dump_dir = sys.argv[1]
close = trainer_module.Trainer.close


def close_and_dump(self):
    if getattr(self, "transformer", None) is not None:
        rank = self.accelerator.process_index
        save_file(lora_state_dict(trainer_module.unwrap_model(self.transformer)), f"{dump_dir}/rank{rank}.safetensors")
    close(self)


trainer_module.Trainer.close = close_and_dump
from apexcli.cli import main

main(sys.argv[2:])
"""


def _torchrun(tmp_path: Path, nproc: int, argv: list[str]) -> subprocess.CompletedProcess:
    launcher = tmp_path / "launch_and_dump.py"
    launcher.write_text(LAUNCHER)
    return torchrun(launcher, nproc, [str(tmp_path), *argv])


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mp")
    out = tmp / "run"
    argv = [
        "train",
        "--preset",
        "tiny",
        "--steps",
        "3",
        "--out",
        str(out),
        "--objectives",
        "brightness,colorfulness",
        *TINY_OVERRIDES,
        # 3 eval prompts: rank 0 evaluates prompts 0 and 2, rank 1 prompt 1
        "eval.every=3",
        "eval.num_prompts=3",
        "eval.num_steps=3",
        "eval.batch_size=2",
    ]
    proc = _torchrun(tmp, 2, argv)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp, out


def test_both_ranks_end_with_identical_lora(two_process_run):
    tmp, out = two_process_run
    rank0 = load_file(str(tmp / "rank0.safetensors"))
    rank1 = load_file(str(tmp / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    # the checkpoint rank 0 wrote is that same LoRA
    saved = load_lora_file(out / "checkpoints" / "step-000003")
    assert all(torch.equal(saved[f"transformer.{k}"], rank0[k]) for k in rank0)
    assert sum(int(torch.count_nonzero(v)) for k, v in rank0.items() if "lora_B" in k) > 0


def test_same_samples_and_advantages_as_one_process(two_process_run, tiny_run):
    """Samples are seeded per (seed, step, global micro-batch start): with 2 samples per rank and
    rollout micro-batches of 2 both runs draw the same noise, so step 1 (same weights) matches
    exactly; later steps follow weights that differ only by the order of float sums (DDP's
    all-reduce vs one process's accumulation), amplified by Adam's sign-like first steps."""
    _, out = two_process_run
    one, two = read_metrics(tiny_run), read_metrics(out)
    assert [r["step"] for r in two] == [1, 2, 3]
    first_one, first_two = one[0], two[0]
    for key, value in first_one.items():
        if key.startswith("time/") or not isinstance(value, float):
            continue
        assert first_two[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert first_two["grad_norm"] == pytest.approx(first_one["grad_norm"], rel=1e-5)  # global gradient
    for a, b in zip(one[1:], two[1:]):
        for key in a:
            if key.startswith("reward/") and key.endswith("/mean"):
                assert b[key] == pytest.approx(a[key], rel=1e-4), key
        assert b["advantage/abs_mean"] == pytest.approx(a["advantage/abs_mean"], rel=1e-2)
    lora_one = load_lora_file(tiny_run / "checkpoints" / "step-000003")
    lora_two = load_lora_file(out / "checkpoints" / "step-000003")
    scale = max(float(v.abs().max()) for v in lora_one.values())
    assert max(float((lora_one[k] - lora_two[k]).abs().max()) for k in lora_one) < 1e-2 * scale


def test_sharded_evaluation_equals_one_process(two_process_run):
    """Each rank evaluates its share of the prompts; the gathered row and files are those of a
    one-process evaluation of the same weights."""
    import json

    from apexcli.eval.evaluator import evaluate_checkpoint

    _, out = two_process_run
    evals = [r for r in read_metrics(out, kind="eval")]
    assert [r["step"] for r in evals] == [0, 3]
    scores = [json.loads(line) for line in (out / "eval" / "step-000000" / "scores.jsonl").read_text().splitlines()]
    assert [s["index"] for s in scores] == [0, 1, 2]
    base = evaluate_checkpoint(out, "base")  # one process, base model
    for key, value in base.items():
        if key.startswith("eval/"):
            assert evals[0][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_anchor_under_ddp_keeps_the_ranks_identical(tmp_path):
    """The anchor adds a second forward with grad before the backward: its gradient must be
    all-reduced with the policy term's, or the ranks (different samples) would drift apart."""
    out = tmp_path / "run"
    argv = [
        "train",
        "--preset",
        "tiny",
        "--steps",
        "2",
        "--out",
        str(out),
        "--objectives",
        "brightness",
        *TINY_OVERRIDES,
        "train.window_size=1",
        "train.experimental.anchor_beta=1.0",
        "train.lr=3e-2",
    ]
    proc = _torchrun(tmp_path, 2, argv)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rank0 = load_file(str(tmp_path / "rank0.safetensors"))
    rank1 = load_file(str(tmp_path / "rank1.safetensors"))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert read_metrics(out)[-1]["anchor"] > 0  # the second update saw a moved LoRA


def test_nft_under_ddp_is_the_one_process_update(tmp_path):
    """train.loss=nft draws its points per group, so two ranks holding one group each compute the
    one-process gradient: same first-update grad norm and flow error, identical LoRA on both ranks.
    With kl_beta the reference forward runs between the policy forward and the backward."""
    from helpers import train_tiny

    nft = [
        "--objectives",
        "brightness",
        "train.loss=nft",
        "train.experimental.nft_timesteps=2",
        "train.kl_beta=0.1",
        "train.lr=3e-2",
    ]
    one = read_metrics(train_tiny(tmp_path / "one", 2, *nft))
    out = tmp_path / "two"
    proc = _torchrun(
        tmp_path, 2, ["train", "--preset", "tiny", "--steps", "2", "--out", str(out), *TINY_OVERRIDES, *nft]
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = read_metrics(out)
    assert two[0]["grad_norm"] == pytest.approx(one[0]["grad_norm"], rel=1e-5)
    assert two[0]["nft_flow_error"] == pytest.approx(one[0]["nft_flow_error"], rel=1e-5)
    rank0 = load_file(str(tmp_path / "rank0.safetensors"))
    rank1 = load_file(str(tmp_path / "rank1.safetensors"))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert two[1]["nft_drift"] == 0.0 and two[1]["kl"] > 0  # the second update starts from a moved LoRA


def test_flux_under_ddp_is_the_one_process_update(tmp_path):
    """FLUX.1 through the same DDP path: two ranks holding one prompt group each compute the
    one-process gradient (same first-update grad norm), and end with identical LoRA weights."""
    from helpers import run_cli

    argv = ["train", "--preset", "tiny-flux", "--steps", "2", *TINY_OVERRIDES]
    result = run_cli([*argv, "--out", str(tmp_path / "one")])
    assert result.code == 0, result.stderr[-3000:]
    one = read_metrics(tmp_path / "one")
    out = tmp_path / "two"
    proc = _torchrun(tmp_path, 2, [*argv, "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = read_metrics(out)
    assert two[0]["grad_norm"] == pytest.approx(one[0]["grad_norm"], rel=1e-5) and two[0]["grad_norm"] > 0
    assert two[0]["ratio_first"] == 1.0
    rank0 = load_file(str(tmp_path / "rank0.safetensors"))
    rank1 = load_file(str(tmp_path / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
