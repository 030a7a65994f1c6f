"""Names, aliases, config overrides and the one-line errors."""

import pytest
import torch

from apexcli.errors import ApexError
from apexcli.rewards import REWARD_NAMES, RewardsConfig, RewardSuite, apply_overrides, canonical_name


def test_names_and_aliases():
    assert set(REWARD_NAMES) == {
        "pick",
        "aes",
        "deqa",
        "ocr",
        "brightness",
        "colorfulness",
        "compressibility",
        "contrast",
        "adherence",
        "quality",
        "appeal",
    }
    assert canonical_name("pickscore") == "pick"
    assert canonical_name("Aesthetic") == "aes"
    assert canonical_name("deqa@http://127.0.0.1:18086") == "deqa"


def test_unknown_objective_is_one_line_listing_valid_names():
    with pytest.raises(ApexError) as err:
        RewardSuite(["brightness", "nosuch"])
    msg = str(err.value)
    assert "\n" not in msg and "'nosuch'" in msg
    assert (
        "valid: adherence, aes, appeal, brightness, colorfulness, compressibility, contrast, deqa, ocr, pick, quality"
        in msg
    )


def test_suite_resolves_aliases_keeps_order_and_refuses_duplicates():
    with RewardSuite(["contrast", "brightness"]) as suite:
        assert suite.objectives == ["contrast", "brightness"]
    with pytest.raises(ApexError, match="twice"):
        RewardSuite(["aes", "aesthetic"])


def test_overrides_are_typed_and_checked():
    cfg = apply_overrides(
        RewardsConfig(),
        [
            "rewards.pick.source=/models/pick",
            "pick.batch_size=4",
            "rewards.deqa.trust_remote_code=true",
            "remote.timeout_s=2.5",
        ],
    )
    assert cfg.pick.source == "/models/pick" and cfg.pick.batch_size == 4
    assert cfg.deqa.trust_remote_code is True and cfg.remote.timeout_s == 2.5
    with pytest.raises(ApexError, match="unknown config key 'rewards.pick.nosuch'"):
        apply_overrides(RewardsConfig(), ["rewards.pick.nosuch=1"])
    with pytest.raises(ApexError, match="rewards.ocr.workers' must be an integer"):
        apply_overrides(RewardsConfig(), ["rewards.ocr.workers=many"])


def test_suite_returns_nan_for_empty_and_checks_lengths():
    with RewardSuite(["brightness"]) as suite:
        R, _ = suite(torch.zeros(0, 3, 4, 4), [])
        assert R.shape == (0, 1)
        with pytest.raises(ApexError, match="2 images but 1 prompts"):
            suite(torch.zeros(2, 3, 4, 4), ["x"])
