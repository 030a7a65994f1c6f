"""The mini world's objectives (adherence, quality, appeal, and OCR on signs) on constructed images.

The short RL check on `mini` (does training on an objective raise it?) is a benchmark, not a test:
on the shared two-core machine one rollout of 8 images at the preset's 10 steps with CFG took
17-26 s, so a run of a few steps with its step-0 and final evals takes minutes, and a margin
over seed noise needs several seeds. `python benchmarks/bench_balance.py --mini --objectives
adherence --strategies static --seeds 2 --steps 4` is that check; docs/experiments/2026-11-30-mini-single-objective-two-cores.md
has its numbers.
"""

import math
import random

import pytest
import torch
import torch.nn.functional as F

from apexcli.rewards import RewardsConfig, RewardSuite, build_reward
from apexcli.rewards.adherence import adherence_parts
from apexcli.rewards.appeal import appeal, appeal_parts
from apexcli.rewards.base import pil_to_tensor
from apexcli.rewards.pixels import component_stats, connected_components
from apexcli.rewards.quality import crispness, noise_sigma, quality
from apexcli.world import parse_prompt, render


def scene(prompt: str, seed: int | None = None) -> torch.Tensor:
    rng = random.Random(seed) if seed is not None else None
    return pil_to_tensor(render(parse_prompt(prompt), 64, rng)).unsqueeze(0)


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    k = torch.arange(-4, 5, dtype=torch.float32)
    g = torch.exp(-(k**2) / (2 * sigma**2))
    g = g / g.sum()
    y = x.reshape(-1, 1, *x.shape[2:])
    y = F.conv2d(F.pad(y, (4, 4, 0, 0), mode="replicate"), g.view(1, 1, 1, 9))
    y = F.conv2d(F.pad(y, (0, 0, 4, 4), mode="replicate"), g.view(1, 1, 9, 1))
    return y.view_as(x)


def reward(name):
    return build_reward(name, RewardsConfig(), "cpu", torch.float32)


# -- adherence ---------------------------------------------------------------------------------


def test_red_circle_scores_full_adherence_for_its_prompt_and_low_for_two_blue_squares():
    img = scene("a red circle")
    scores, _ = reward("adherence")(img.repeat(2, 1, 1, 1), ["a red circle", "two blue squares"])
    assert scores[0].item() == pytest.approx(24.0, abs=0.1)  # 16 + 8·a with a ≈ 1
    assert scores[1].item() == pytest.approx(16.0, abs=1e-6)  # no blue pixel: colour, count, shape all 0


def test_adherence_is_graded_per_attribute():
    img = scene("a red circle on the right on white")
    prompts = [
        "a red circle on the right on white",
        "a red circle on the left on white",
        "a red circle on the right on black",
        "three red circles on the right on white",
        "a red square on the right on white",
    ]
    a, parts = adherence_parts(img.repeat(len(prompts), 1, 1, 1), prompts)
    assert a[0] > 0.97
    assert parts[1]["position"] < 0.05 and a[1] == pytest.approx(0.8, abs=0.03)  # 4 of 5 attributes
    assert parts[2]["background"] < 0.01 and a[2] == pytest.approx(0.8, abs=0.03)
    assert parts[3]["count"] == pytest.approx(1 / 3)  # one of three: |1 - 3| / 3 off
    assert parts[4]["shape"] < 0.2  # a circle's fill ratio π/4 is far from a square's 1


@pytest.mark.parametrize(
    "prompt",
    [
        "two green triangles at the top on gray",
        "three purple squares on the left on black",
        "a yellow circle at the bottom on white",
        "two orange circles in the center",
    ],
)
def test_ground_truth_renders_satisfy_their_prompts(prompt):
    a, parts = adherence_parts(scene(prompt, seed=3), [prompt])
    assert a[0] > 0.95, parts


def test_sign_adherence_needs_board_and_writing():
    prompt = 'a sign that says "CAT"'
    sign = scene(prompt)
    blank = sign.clone()
    blank[:, :, 12:44, 5:59] = torch.tensor([250, 250, 250]).view(1, 3, 1, 1) / 255  # board, no ink
    sky = torch.tensor([110, 170, 230]).view(1, 3, 1, 1).expand(1, 3, 64, 64) / 255
    a, parts = adherence_parts(torch.cat([sign, blank, sky]), [prompt] * 3)
    assert a[0] == pytest.approx(1.0)
    assert parts[1]["board"] == pytest.approx(1.0) and parts[1]["writing"] == 0.0
    assert a[2] == 0.0


def test_prompt_outside_the_grammar_is_nan_and_masked_in_the_suite():
    img = scene("a red circle")
    with RewardSuite(["adherence", "brightness"]) as suite:
        R, _ = suite(img.repeat(2, 1, 1, 1), ["a photo of a cat", "a red circle"])
    assert math.isnan(R[0, 0].item()) and math.isfinite(R[0, 1].item())
    assert R[1, 0].item() > 23.9


def test_connected_components_count_and_measure_blobs():
    mask = torch.zeros(2, 16, 16, dtype=torch.bool)
    mask[0, 1:5, 1:5] = True  # 4x4 square
    mask[0, 8:10, 10:16] = True  # 2x6 bar
    mask[0, 12, 12] = False
    mask[1, 3, 3] = True
    c = component_stats(connected_components(mask))
    assert c.area[0].tolist() == [16.0, 12.0] and c.area[1].tolist() == [1.0, 0.0]
    assert (c.width[0, 0].item(), c.height[0, 0].item()) == (4.0, 4.0)
    assert c.cx[0, 0].item() == pytest.approx(3.0 / 16)  # pixel centres 1.5..4.5 -> mean 3 / 16
    assert c.fill[0, 1].item() == pytest.approx(1.0)


# -- quality -----------------------------------------------------------------------------------


def test_quality_formula_on_hand_computed_images():
    flat = torch.full((1, 3, 16, 16), 0.5)
    assert quality(flat).item() == pytest.approx(3.0)  # crisp 0 (nothing changes), clean 1
    half = torch.zeros(1, 3, 16, 16)
    half[..., 8:] = 1.0  # one vertical edge: 16 jumps of |(1,1,1)| = √3
    total = 16 * math.sqrt(3)
    assert crispness(half).item() == pytest.approx(total / (total + 1))
    assert noise_sigma(half).item() == 0.0  # the Laplacian fires on the edge only: median 0


def test_quality_drops_under_blur_and_noise():
    prompts = ["two green triangles at the top on gray", 'a sign that says "BOOK"', "a blue square on white"]
    clean = torch.cat([scene(p, seed=1) for p in prompts])
    g = torch.Generator().manual_seed(0)
    q = quality(clean)
    assert (q > 4.3).all()  # slanted triangle edges leave some change in sub-0.2 anti-aliasing steps
    assert (quality(blur(clean, 1.0)) < q - 0.3).all()
    assert (quality(blur(clean, 2.0)) <= quality(blur(clean, 1.0))).all()  # crisp bottoms out at 0: q = 3
    noisy = (clean + torch.randn(clean.shape, generator=g) * 4 / 255).clamp(0, 1)
    assert (quality(noisy) < q - 1.0).all()


# -- appeal ------------------------------------------------------------------------------------


def test_appeal_terms_behave_as_documented():
    centred, left = scene("a red circle in the center on white"), scene("a red circle on the left on white")
    parts = appeal_parts(torch.cat([centred, left]))
    assert parts["centring"][0] > 0.95 and parts["centring"][1] == pytest.approx(0.5, abs=0.05)  # 0.25 off
    on_black, on_white = scene("a yellow square on black"), scene("a yellow square on white")
    c = appeal_parts(torch.cat([on_black, on_white]))["contrast"]
    assert c[0] == 1.0 and c[1] < 0.5  # yellow barely differs from white in luma
    two_hues = scene("a red square in the center on white")
    two_hues[:, :, :, 32:] = scene("a green square in the center on white")[:, :, :, 32:]
    h = appeal_parts(torch.cat([centred, two_hues]))["harmony"]
    assert h[0] > 0.95 and h[1] < 0.8  # hues ≈ 125° apart partly cancel in the chroma resultant
    blank = torch.full((1, 3, 64, 64), 0.3)
    assert appeal(blank).item() == pytest.approx(5 + 1.5 * 0.25)  # only harmony (1) is non-zero
    one, three = scene("a red square in the center on white"), scene("three red squares in the center on white")
    cov = appeal_parts(torch.cat([one, three]))["coverage"]
    assert cov[1] > cov[0]  # 3.8 % of the frame is further from a fifth than 11 %


@pytest.mark.parametrize("name", ["adherence", "quality", "appeal"])
def test_pil_input_equals_tensor_input_and_mixed_sizes_work(name):
    from apexcli.rewards.base import tensor_to_pil

    prompts = ["a red circle on the left on white", "two blue squares at the top on gray"]
    images = torch.cat([scene(p, seed=0) for p in prompts])
    r = reward(name)
    from_tensor, _ = r(images, prompts)
    from_pil, _ = r([tensor_to_pil(t) for t in images], prompts)
    assert torch.allclose(from_tensor, from_pil, atol=1e-5)
    mixed = [tensor_to_pil(images[0]), tensor_to_pil(images[1]).resize((48, 48))]
    scores, _ = r(mixed, prompts)
    assert scores.shape == (2,) and torch.isfinite(scores).all()


# -- OCR on the world's signs ------------------------------------------------------------------


def test_a_sign_with_the_right_word_scores_ocr_one():
    pytest.importorskip("rapidocr")
    cfg = RewardsConfig()
    cfg.ocr.det_side = 128  # 64 px renders: the default 736 px detection is ~10x slower, reads the same
    cfg.ocr.workers = 1
    ocr = build_reward("ocr", cfg, "cpu", torch.float32)
    try:
        scores, info = ocr(
            scene('a sign that says "FISH"').repeat(2, 1, 1, 1), ['a sign that says "FISH"', 'a sign that says "MILK"']
        )
    finally:
        ocr.close()
    assert scores[0].item() == 1.0, info
    assert scores[1].item() < 0.5  # FISH vs MILK: 3 of 4 letters differ
