"""OCR reward on rendered English words, upright and upside down, for each `rewards.ocr.upside_down`.

    python benchmarks/ocr_orientation.py     # 3 engines x 24 images: a few CPU minutes (RapidOCR
                                             # scales the short side up to 736 px before detection)

Words are drawn with Pillow in matplotlib's DejaVu fonts (black on white), read by the bundled
RapidOCR models, scored by the project's OCR reward against the word. The reference (PaddleOCR,
English model, no angle classifier) gives upside-down text nothing; `drop` is meant to do the
same with a recogniser that reads rotated text.
"""

from __future__ import annotations

import json
import os
import sys

import matplotlib
from PIL import Image, ImageDraw, ImageFont

from apexcli.rewards import OcrConfig
from apexcli.rewards.ocr import OcrReward

WORDS = [
    "OPEN",
    "STOP",
    "Kitchen",
    "GRAPE",
    "Bakery",
    "REWARD",
    "lighthouse",
    "Fresh Juice",
    "HELLO WORLD",
    "Coffee Shop",
    "SALE 50% OFF",
    "Happy Birthday",
]
FONTS = ["DejaVuSans.ttf"]  # DejaVuSerif.ttf too with --serif


def render(text: str, font_file: str, size: tuple[int, int] = (480, 112), font_size: int = 40) -> Image.Image:
    font = ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", font_file), font_size)
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text(
        ((size[0] - (right - left)) // 2 - left, (size[1] - (bottom - top)) // 2 - top), text, fill="black", font=font
    )
    return img


def main() -> None:
    fonts = FONTS + ["DejaVuSerif.ttf"] * ("--serif" in sys.argv)
    images, prompts = [], []
    for font in fonts:
        for word in WORDS:
            images.append(render(word, font))
            prompts.append(f'a sign that says "{word}"')
    flipped = [im.rotate(180) for im in images]
    out = {}
    for mode in ("drop", "rotate", "read"):
        reward = OcrReward(OcrConfig(backend="rapidocr", workers=1, upside_down=mode))
        try:
            up, _ = reward(images, prompts)
            down, _ = reward(flipped, prompts)
        finally:
            reward.close()
        out[mode] = {
            "upright_mean": round(up.mean().item(), 3),
            "upright_exact": int((up == 1).sum()),
            "upside_down_mean": round(down.mean().item(), 3),
            "upside_down_exact": int((down == 1).sum()),
            "n": len(images),
        }
        print(
            f"{mode:<7} upright mean {out[mode]['upright_mean']:.3f} ({out[mode]['upright_exact']}/{len(images)} exact)"
            f"   upside down mean {out[mode]['upside_down_mean']:.3f} ({out[mode]['upside_down_exact']}/{len(images)} exact)"
        )
    print(json.dumps({"bench": "ocr_orientation", **out}))


if __name__ == "__main__":
    main()
