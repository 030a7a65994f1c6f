"""Toy metrics: hand-computed values on constructed images."""

import io
import math

import pytest
import torch
from PIL import Image

from apexcli.rewards import RewardsConfig, build_reward
from apexcli.rewards.toy import brightness, colorfulness, contrast, jpeg_kilobytes


def solid(rgb, h=8, w=8):
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, h, w).clone()


def test_brightness_is_rec601_luma_mean():
    assert brightness(solid([1.0, 0.0, 0.0])).item() == pytest.approx(0.299)
    assert brightness(solid([0.2, 0.4, 0.6])).item() == pytest.approx(0.299 * 0.2 + 0.587 * 0.4 + 0.114 * 0.6)
    assert brightness(solid([1.0, 1.0, 1.0])).item() == pytest.approx(1.0)


def test_contrast_is_rms_of_luma():
    half = torch.zeros(1, 3, 8, 8)
    half[..., 4:, :] = 1.0  # half black, half white: luma std = 0.5
    assert contrast(half).item() == pytest.approx(0.5)
    assert contrast(solid([0.3, 0.6, 0.9])).item() == pytest.approx(0.0, abs=1e-6)


def test_colorfulness_hasler_susstrunk_by_hand():
    assert colorfulness(solid([0.5, 0.5, 0.5])).item() == pytest.approx(0.0, abs=1e-4)
    # pure red: rg = 255, yb = 127.5, no spread -> 0.3 * sqrt(255^2 + 127.5^2)
    assert colorfulness(solid([1.0, 0.0, 0.0])).item() == pytest.approx(0.3 * math.hypot(255, 127.5), rel=1e-5)
    # half red / half green: rg = +-255 (std 255, mean 0), yb = 127.5 everywhere
    img = torch.zeros(1, 3, 8, 8)
    img[0, 0, :4] = 1.0
    img[0, 1, 4:] = 1.0
    assert colorfulness(img).item() == pytest.approx(255 + 0.3 * 127.5, rel=1e-5)


def test_compressibility_is_negative_jpeg_kilobytes():
    reward = build_reward("compressibility", RewardsConfig(), "cpu", torch.float32)
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(1, 3, 64, 64, generator=g)
    flat = solid([0.5, 0.5, 0.5], 64, 64)
    scores, _ = reward(torch.cat([flat, noise]))
    arr = (noise[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    assert scores[1].item() == pytest.approx(-buf.tell() / 1000.0)
    assert scores[0] > scores[1]  # a flat image compresses better than noise
    assert jpeg_kilobytes(Image.fromarray(arr), 95) == pytest.approx(buf.tell() / 1000.0)


@pytest.mark.parametrize("name", ["brightness", "contrast", "colorfulness", "compressibility"])
def test_pil_input_equals_tensor_input_and_mixed_sizes_work(name):
    reward = build_reward(name, RewardsConfig(), "cpu", torch.float32)
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(3, 3, 16, 24, generator=g) * 255).round() / 255  # exact 8-bit levels
    pils = [Image.fromarray((t.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()) for t in x]
    from_tensor, _ = reward(x)
    from_pil, _ = reward(pils)
    torch.testing.assert_close(from_tensor, from_pil, rtol=1e-5, atol=1e-5)
    mixed = pils + [pils[0].resize((10, 30))]
    scores, _ = reward(mixed)
    assert scores.shape == (4,) and torch.isfinite(scores).all()
    torch.testing.assert_close(scores[:3], from_pil, rtol=1e-5, atol=1e-5)
