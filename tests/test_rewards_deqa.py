"""deqa through AutoModelForCausalLM remote code, on a tiny local model dir; refused without the flag."""

import pytest
import torch

from apexcli.errors import ApexError
from apexcli.rewards import DeqaConfig, RewardsConfig, RewardSuite
from apexcli.rewards.base import ImageBatch
from apexcli.rewards.deqa import DeQAScore
from reward_models import expected_deqa, save_tiny_deqa


@pytest.fixture(scope="module")
def deqa_dir(tmp_path_factory):
    return save_tiny_deqa(str(tmp_path_factory.mktemp("deqa")))


def test_refused_without_trust_remote_code(deqa_dir):
    with pytest.raises(ApexError) as err:
        DeQAScore(DeqaConfig(source=deqa_dir))
    msg = str(err.value)
    assert "--trust-remote-code" in msg and "make deqa-server" in msg and "\n" not in msg


def test_scores_with_the_flag_equal_the_model_formula(deqa_dir):
    reward = DeQAScore(DeqaConfig(source=deqa_dir, trust_remote_code=True, batch_size=2, dtype="float32"))
    x = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    scores, _ = reward(x)
    expected = torch.tensor(expected_deqa(ImageBatch(x).pil()), dtype=torch.float32)
    torch.testing.assert_close(scores, expected)
    assert (scores >= 1).all() and (scores <= 5).all()


def test_in_a_suite(deqa_dir):
    cfg = RewardsConfig()
    cfg.deqa.source, cfg.deqa.trust_remote_code, cfg.deqa.dtype = deqa_dir, True, "float32"
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with RewardSuite(["brightness", "deqa"], config=cfg) as suite:
        R, _ = suite(x, None)
    torch.testing.assert_close(R[:, 1], torch.tensor(expected_deqa(ImageBatch(x).pil()), dtype=torch.float32))
