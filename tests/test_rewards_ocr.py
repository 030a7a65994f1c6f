"""OCR reward: the formula by hand, and RapidOCR reading rendered text for real."""

import math

import numpy as np
import pytest
from PIL import Image

from apexcli.errors import ApexError
from apexcli.rewards import OcrConfig
from apexcli.rewards.ocr import OcrReward, normalize_text, ocr_reward, ocr_target, to_bgr
from reward_models import text_image


def test_target_is_first_quoted_text_lowercased_without_spaces():
    assert ocr_target('a sign that says "HELLO World" and "other"') == "helloworld"
    assert ocr_target("a “Curly Quote” poster") == "curlyquote"
    # straight quotes first, as the reference's prompt.split('"')[1]
    assert ocr_target('a “big” sign saying "OPEN"') == "open"
    assert ocr_target('a sign saying "OPEN') == "open"  # unclosed: the rest of the prompt
    assert ocr_target("no quotes here") is None
    assert ocr_target('empty "" quotes') is None
    assert normalize_text(" A b\tC\n") == "abc"


def test_reward_by_hand():
    assert ocr_reward("HELLO WORLD", "helloworld") == 1.0
    assert ocr_reward("HELL0 WORLD", "helloworld") == pytest.approx(1 - 1 / 10)  # one substitution
    assert ocr_reward("HELLO", "helloworld") == pytest.approx(1 - 5 / 10)  # five deletions
    assert ocr_reward("", "abc") == 0.0
    assert ocr_reward("a very long unrelated text", "ab") == 0.0  # distance capped at len(target)
    assert ocr_reward("the big Hello World sign 2024", "helloworld") == 1.0  # substring rule
    assert math.isnan(ocr_reward("anything", None))


def test_preprocessing_converts_every_mode_to_rgb_then_bgr():
    cmyk = Image.new("CMYK", (4, 2), (0, 255, 255, 0))  # pure red in CMYK
    bgr = to_bgr(cmyk)
    assert bgr.shape == (2, 4, 3) and bgr.dtype == np.uint8
    assert tuple(bgr[0, 0]) == (0, 0, 255)


def test_rapidocr_reads_hello_world_exactly(rapidocr):
    img = text_image("HELLO WORLD")
    prompts = ['a sign that says "HELLO WORLD"', 'a sign that says "HELLO WORLDS"', 'a sign "hello"', "no quote"]
    scores, info = rapidocr([img, img, img.convert("CMYK"), img], prompts)
    assert normalize_text(info["text"][0]) == "helloworld"
    assert scores[0].item() == 1.0
    assert scores[1].item() == pytest.approx(1 - 1 / 11)  # 'helloworld' vs 'helloworlds': one insertion
    assert scores[2].item() == 1.0  # CMYK input read the same; 'hello' is contained
    assert math.isnan(scores[3].item()) and info["text"][3] == ""  # no quote: not even read


def test_upside_down_text_earns_nothing_unless_asked(rapidocr):
    # The bundled PP-OCRv6 recogniser reads this word upside down with the classifier off;
    # the default (drop) must not reward it, as the reference's OCR does not.
    upright = text_image("Kitchen")
    flipped = upright.rotate(180)
    scores, info = rapidocr([upright, flipped], ['"Kitchen"'] * 2)
    assert scores.tolist() == [1.0, 0.0] and info["text"][1] == ""
    rotate = OcrReward(OcrConfig(backend="rapidocr", workers=1, upside_down="rotate"))
    try:
        assert rotate([flipped], ['"Kitchen"'])[0].tolist() == [1.0]
    finally:
        rotate.close()
    with pytest.raises(ApexError, match="upside_down 'flip'; valid: drop, rotate, read"):
        OcrReward(OcrConfig(upside_down="flip"))


def test_unknown_backend_is_refused():
    with pytest.raises(ApexError, match="valid: rapidocr, paddleocr"):
        OcrReward(OcrConfig(backend="tesseract"))


@pytest.mark.paddle
@pytest.mark.parametrize("backend", ["paddleocr"])
def test_paddleocr_reads_hello_world(backend):
    reward = OcrReward(OcrConfig(backend=backend, workers=1))
    scores, _ = reward([text_image("HELLO WORLD")], ['"HELLO WORLD"'])
    assert scores[0].item() == 1.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("rewards.ocr.det_side=100000000", "config key 'rewards.ocr.det_side' must be in [0, 4096], got 100000000"),
        ("rewards.ocr.det_side=-5", "config key 'rewards.ocr.det_side' must be in [0, 4096], got -5"),
        ("rewards.ocr.workers=100000", "config key 'rewards.ocr.workers' must be in [1, 64], got 100000"),
    ],
)
def test_ocr_sizes_out_of_range_are_one_line_errors(tmp_path, override, message):
    """det_side=1e8 failed inside RapidOCR with a traceback, a negative one was silently the
    default, and 100000 workers (one engine each) never finished loading."""
    from PIL import Image

    from helpers import run_cli

    Image.new("RGB", (16, 16), "white").save(tmp_path / "a.png")
    result = run_cli(
        [
            "score",
            str(tmp_path / "a.png"),
            "-O",
            "ocr",
            "--prompt",
            'a "hi" sign',
            "--out",
            str(tmp_path / "s"),
            "--device",
            "cpu",
            "--no-progress",
            "--set",
            override,
        ]
    )
    assert result.code == 2 and result.stderr.strip() == f"error: {message}"
