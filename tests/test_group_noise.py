"""Shared initial noise within a prompt group, through the trainer (seeds are 63-bit mixes)."""

from __future__ import annotations

import torch

from apexcli.flow.rollout import initial_noise
from apexcli.runs import RunDir
from apexcli.seeds import mix_seed
from apexcli.train import run_training


def test_group_noise_accepts_63_bit_seeds_and_is_shared_within_groups():
    seed = mix_seed(42, 7)
    assert seed * 1_000_003 > 2**63  # the trainer's seeds are large: they must not overflow the generator
    noise = initial_noise(4, (2, 3, 3), group_ids=[5, 5, 6, 6], share_within_group=True, seed=seed, device="cpu")
    assert torch.equal(noise[0], noise[1]) and torch.equal(noise[2], noise[3])
    assert not torch.equal(noise[0], noise[2])


def test_training_with_shared_group_noise_is_on_policy(tmp_path):
    options = {
        "out": str(tmp_path / "run"),
        "objectives": ["contrast"],
        "sampling": {"num_steps": 3, "share_group_noise": True},
        "train": {"steps": 1, "prompts_per_step": 2, "group_size": 2, "rollout_batch_size": 4, "train_batch_size": 2},
        "logging": {"progress": False},
        "eval": {"every": 0},
    }
    run = RunDir(run_training(preset="tiny", options=options, argv=["test"]))
    (row,) = run.read_metrics().rows
    assert abs(row["ratio_first"] - 1.0) < 1e-5
