"""Rewards added from outside the package: as ``module:Class`` on the Python path or as an
installed entry point, with typed options from ``rewards.extra.<name>`` and their own scope."""

from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from apexcli.errors import ApexError
from apexcli.rewards import RewardsConfig, RewardSuite, apply_overrides
from apexcli.rewards.registry import canonical_name
from helpers import TINY_OVERRIDES, load_lora_file, read_metrics, run_cli, train_tiny

MODULE = '''
from dataclasses import dataclass

import torch

from apexcli.rewards.base import Reward
from apexcli.schema import setting


@dataclass
class GreenOptions:
    margin: float = setting(0.0, ge=0, le=1)


class Greenness(Reward):
    """How far green exceeds red and blue."""

    name = "greenness"
    Options = GreenOptions

    def __init__(self, options, device="cpu", dtype=torch.float32):
        self.margin = options.margin

    def score(self, batch, prompts):
        scores = [(im[1] - torch.maximum(im[0], im[2]) - self.margin).clamp(min=0).mean() for im in batch.per_image()]
        return torch.stack(scores).float().cpu(), {}


class OnlyDogs(Reward):
    """1 for every image of a prompt that mentions a dog; NaN elsewhere."""

    needs_prompt = True
    prompt_requirement = "prompts that mention a dog"
    prompt_fix = "prompts.train=FILE with dogs in it"

    @classmethod
    def applies_to(cls, prompt):
        return "dog" in prompt

    def __init__(self, options, device="cpu", dtype=torch.float32):
        pass

    def score(self, batch, prompts):
        return torch.tensor([1.0 if self.applies_to(p) else float("nan") for p in prompts]), {}


class NotAReward:
    pass
'''


@pytest.fixture
def outside(tmp_path, monkeypatch) -> str:
    """A module of rewards written outside the package and put on sys.path; returns its name."""
    name = "outside_rewards"  # one name: the same reward imported again from another folder
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_a_reward_from_outside_trains_tiny(outside, tmp_path):
    out = train_tiny(
        tmp_path / "run", 2, "--objectives", f"brightness,{outside}:Greenness", "rewards.extra.greenness.margin=0.01"
    )
    rows = read_metrics(out)
    assert len(rows) == 2
    assert all(math.isfinite(r["reward/greenness/mean"]) and math.isfinite(r["reward/brightness/mean"]) for r in rows)
    assert all("balance/weight/greenness" in r for r in rows)
    lora = load_lora_file(out / "checkpoints" / "step-000002")
    moved = [k for k, v in lora.items() if "lora_B" in k and v.abs().sum() > 0]  # B starts at 0
    assert moved, "the LoRA did not move"


def test_name_options_and_scope(outside):
    assert canonical_name(f"{outside}:Greenness") == "greenness" == canonical_name("greenness")
    config = apply_overrides(RewardsConfig(), ["rewards.extra.greenness.margin=0.5"])
    with RewardSuite([f"{outside}:Greenness", f"{outside}:OnlyDogs"], config=config) as suite:
        assert suite.objectives == ["greenness", "onlydogs"]
        green = torch.zeros(2, 3, 8, 8)
        green[:, 1] = 1.0
        scores, _ = suite(green, ["a dog", "a cat"])
        assert scores[:, 0].tolist() == [0.5, 0.5]  # the margin came from rewards.extra
        assert scores[0, 1] == 1.0 and math.isnan(scores[1, 1])
        assert suite.applies(["a dog", "a cat"]).tolist() == [[True, True], [True, False]]


def test_bad_options_and_bad_names_are_one_line(outside):
    with pytest.raises(ApexError, match=r"'rewards\.extra\.greenness\.margin' must be in \[0, 1\], got 2"):
        RewardSuite([f"{outside}:Greenness"], config=apply_overrides(RewardsConfig(), ["extra.greenness.margin=2"]))
    with pytest.raises(ApexError, match=r"unknown config key 'rewards\.extra\.greenness\.margn'"):
        RewardSuite([f"{outside}:Greenness"], config=apply_overrides(RewardsConfig(), ["extra.greenness.margn=2"]))
    with pytest.raises(ApexError, match="takes no options"):
        RewardSuite([f"{outside}:OnlyDogs"], config=apply_overrides(RewardsConfig(), ["extra.onlydogs.x=1"]))
    with pytest.raises(ApexError, match=r"not a subclass of apexcli\.rewards\.base\.Reward"):
        canonical_name(f"{outside}:NotAReward")
    with pytest.raises(ApexError, match="has no class 'Nope'"):
        canonical_name(f"{outside}:Nope")
    with pytest.raises(ApexError, match="cannot import module 'no_such_module_anywhere'"):
        canonical_name("no_such_module_anywhere:Reward")


def test_an_objective_that_applies_to_no_training_prompt_is_refused(outside, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    result = run_cli(
        [
            "train",
            "--preset",
            "tiny",
            "--out",
            str(tmp_path / "run"),
            "--objectives",
            f"brightness,{outside}:OnlyDogs",
            f"prompts.train={prompts}",
            "logging.progress=false",
        ]
    )
    assert result.code == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: objective 'onlydogs' needs prompts that mention a dog, and prompts.train={prompts} has none; "
        "use prompts.train=FILE with dogs in it"
    )
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_an_installed_entry_point_is_found_by_its_name(outside, tmp_path, monkeypatch):
    dist = tmp_path / "outside_rewards-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: outside-rewards\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[apexcli.rewards]\nverdancy = {outside}:Greenness\n")
    assert canonical_name("Verdancy") == "verdancy"
    with RewardSuite(["verdancy"]) as suite:
        scores, _ = suite(torch.ones(1, 3, 4, 4) * torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1))
        assert scores.tolist() == [[1.0]]
    with pytest.raises(ApexError, match=r"valid: adherence, .*; installed: verdancy; or a reward of your own"):
        canonical_name("nosuch")


def test_the_example_scores_red_above_green():
    example = Path(__file__).parents[1] / "examples" / "custom_reward"
    sys.path.insert(0, str(example))
    try:
        images = torch.zeros(2, 3, 4, 4)
        images[0, 0] = 1.0  # red
        images[1, 1] = 1.0  # green
        with RewardSuite(["my_rewards:Redness"]) as suite:
            scores, _ = suite(images)
        assert scores[:, 0].tolist() == [1.0, 0.0]
    finally:
        sys.path.remove(str(example))
        sys.modules.pop("my_rewards", None)


def test_an_evaluation_it_applies_nowhere_is_said_once(outside, tmp_path):
    train_prompts, eval_prompts = tmp_path / "train.txt", tmp_path / "eval.txt"
    train_prompts.write_text("a dog on grass\na red circle\n")
    eval_prompts.write_text("a blue square\na green cat\n")
    result = run_cli(
        [
            "train",
            "--preset",
            "tiny",
            "--steps",
            "1",
            "--out",
            str(tmp_path / "run"),
            *TINY_OVERRIDES,
            "--objectives",
            f"brightness,{outside}:OnlyDogs",
            f"prompts.train={train_prompts}",
            f"prompts.eval={eval_prompts}",
            "eval.every=1",
            "eval.num_prompts=2",
            "eval.batch_size=2",
        ]
    )
    assert result.code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: objective 'onlydogs'")]
    assert warnings == [
        f"warning: objective 'onlydogs' applies to none of the 2 prompts of the evaluation "
        f"(prompts.eval={eval_prompts}), so its scores there are NaN; it needs prompts that mention a dog"
    ]


def test_a_resume_announces_changed_reward_options(outside, tmp_path):
    base = [
        "train",
        "--preset",
        "tiny",
        "--out",
        str(tmp_path / "run"),
        *TINY_OVERRIDES,
        "--objectives",
        f"brightness,{outside}:Greenness",
    ]
    assert run_cli([*base, "--steps", "1", "rewards.extra.greenness.margin=0.1"]).code == 0
    resumed = run_cli([*base, "--steps", "2", "--resume", "auto", "rewards.extra.greenness.margin=0.2"])
    assert resumed.code == 0, resumed.stderr
    assert "rewards.extra.greenness.margin: 0.1 -> 0.2" in resumed.stderr
