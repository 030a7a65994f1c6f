"""RewardSuite equals each reward alone, in any order and batch size; submit() equals a call."""

import math

import pytest
import torch

from apexcli.rewards import RewardsConfig, RewardSuite, build_reward
from apexcli.rewards.base import ImageBatch, pil_to_tensor
from helpers import HANG_GUARD_S
from reward_models import save_tiny_aes, save_tiny_clip, text_image

NAMES = ["pick", "aes", "ocr", "brightness", "colorfulness", "compressibility", "contrast"]


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    cfg = RewardsConfig()
    cfg.pick.source = cfg.pick.processor_source = save_tiny_clip(str(root / "pick"), seed=3)
    cfg.aes.clip_source, cfg.aes.head_source = save_tiny_aes(str(root / "aes"), seed=4)
    return cfg


@pytest.fixture(scope="module")
def batch():
    """7 images: two with rendered text, the rest noise; two prompts quote text."""
    g = torch.Generator().manual_seed(0)
    noise = list((torch.rand(5, 3, 96, 320, generator=g) * 255).round() / 255)
    text = [pil_to_tensor(text_image(t)) for t in ("HELLO WORLD", "APEX")]
    images = torch.stack(text + noise)
    prompts = ['a sign "HELLO WORLD"', 'a logo "APEX"', "a cat", "a dog", "sky", "a cat", "sea"]
    return images, prompts


@pytest.fixture(scope="module")
def alone(config, batch):
    images, prompts = batch
    out = {}
    for name in NAMES:
        reward = build_reward(name, config, "cpu", torch.float32)
        out[name] = reward(images, prompts)[0]
        reward.close()
    return out


def assert_same(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("order,batch_size", [(NAMES, 32), (list(reversed(NAMES)), 3)])
def test_suite_equals_each_reward_alone(config, batch, alone, order, batch_size):
    images, prompts = batch
    cfg = RewardsConfig(**{k: getattr(config, k) for k in ("pick", "aes", "deqa", "ocr", "toy", "remote")})
    cfg.pick.batch_size = cfg.aes.batch_size = batch_size
    with RewardSuite(order, config=cfg) as suite:
        R, info = suite(images, prompts)
        assert R.shape == (7, len(order)) and R.dtype == torch.float32 and R.device.type == "cpu"
        for k, name in enumerate(order):
            assert_same(R[:, k], alone[name])
        # OCR applies to the two quoted prompts only
        assert R[:2, order.index("ocr")].tolist() == [1.0, 1.0]
        assert all(math.isnan(v) for v in R[2:, order.index("ocr")].tolist())
        assert info["ocr"]["target"][:2] == ["helloworld", "apex"]
        # chunks of any size give the same rows
        parts = [suite(images[i : i + 2], prompts[i : i + 2])[0] for i in range(0, 7, 2)]
        assert_same(torch.cat(parts), R)


def test_submit_overlaps_and_equals_a_call(config, batch):
    images, prompts = batch
    with RewardSuite(["pick", "brightness", "ocr"], config=config) as suite:
        fut1 = suite.submit(images[:4], prompts[:4])
        fut2 = suite.submit(images[4:], prompts[4:])
        R = torch.cat([fut1.result(timeout=HANG_GUARD_S)[0], fut2.result(timeout=HANG_GUARD_S)[0]])
        assert_same(R, suite(images, prompts)[0])


def test_pil_and_tensor_inputs_agree_on_8bit_images(config, batch):
    images, prompts = batch
    with RewardSuite(["pick", "aes", "contrast"], config=config) as suite:
        assert_same(suite(ImageBatch(images).pil(), prompts)[0], suite(images, prompts)[0])
