"""Ground-truth renders of the world's scenes, and the layout geometry rewards check against.

Everything is drawn at 4x the target size and box-filtered down, so edges are anti-aliased but
flat regions stay exactly the palette colour. Text uses Pillow's built-in scalable font
(`ImageFont.load_default(size=...)`), so nothing is downloaded.

Layout (fractions of the image side S; the same for every size):
  - shapes: `count` objects of side 0.22 S on a line. left/right: a column at x = 0.25 S / 0.75 S;
    top/bottom: a row at y = 0.25 S / 0.75 S; center: a row at y = 0.5 S. Along the line the
    centres sit at 0.5 S + (i - (n-1)/2) * 0.3 S. An rng adds up to +-0.03 S of jitter.
  - signs: sky background, a white board (0.03-0.97 S wide, 0.18-0.70 S high) on a brown post,
    the word in black capitals in fixed-pitch slots centred on the board, as large as fits.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

from apexcli.world.grammar import (
    BACKGROUND_COLORS,
    COLORS,
    DEFAULT_BACKGROUND,
    DEFAULT_POSITION,
    SIGN_BOARD,
    SIGN_INK,
    SIGN_POST,
    SIGN_SKY,
    WORDS,
    Scene,
)

SUPERSAMPLE = 4
OBJECT_SIZE = 0.22  # side of one object, in image sides
SPACING = 0.30  # centre-to-centre distance along the line
JITTER = 0.03
# centre of the line each position puts its objects on: (axis along which objects spread, fixed coordinate)
_LINES: dict[str, tuple[str, float]] = {
    "left": ("y", 0.25),
    "right": ("y", 0.75),
    "top": ("x", 0.25),
    "bottom": ("x", 0.75),
    "center": ("x", 0.50),
}
BOARD = (0.03, 0.18, 0.97, 0.70)  # x0, y0, x1, y1 of the sign board
POST = (0.45, 0.70, 0.55, 1.0)
TEXT_HEIGHT = 0.30  # font size as a fraction of S (capped so the word fits the board)


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in pixels (x0, y0 inclusive; x1, y1 exclusive), with what is drawn in it."""

    x0: float
    y0: float
    x1: float
    y1: float
    label: str  # "circle" | "square" | "triangle" | "board" | "text" | "post"

    @property
    def center(self) -> tuple[float, float]:
        return ((self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2)


def position_of(x: float, y: float, size: int) -> str:
    """The position word a point (pixels) is closest to under this layout; used to judge where
    an object was drawn. Compares the point's offset from the centre along each axis."""
    dx, dy = x / size - 0.5, y / size - 0.5
    if max(abs(dx), abs(dy)) < 0.125:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def layout(scene: Scene, size: int = 64, rng: random.Random | None = None) -> list[Box]:
    """Where each object of the scene goes (pixels). Signs: board, text and post boxes. The rng
    draws the same jitter as `render` with an rng seeded alike."""
    if scene.kind == "sign":
        return _sign_layout(scene.word, size)
    position = scene.position or DEFAULT_POSITION
    axis, fixed = _LINES[position]
    half = OBJECT_SIZE * size / 2
    boxes = []
    for i in range(scene.count):
        along = 0.5 + (i - (scene.count - 1) / 2) * SPACING
        cx, cy = (along, fixed) if axis == "x" else (fixed, along)
        if rng is not None:
            cx += rng.uniform(-JITTER, JITTER)
            cy += rng.uniform(-JITTER, JITTER)
        cx, cy = cx * size, cy * size
        boxes.append(Box(cx - half, cy - half, cx + half, cy + half, scene.shape))
    return boxes


@lru_cache(maxsize=64)
def _font(pixels: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=pixels)


def _stroke(font: ImageFont.FreeTypeFont) -> int:
    return max(1, round(font.size / 14))  # a touch of weight: strokes survive the 4x downsampling


@lru_cache(maxsize=8)
def _text_font(size: int) -> tuple[ImageFont.FreeTypeFont, float, float]:
    """(font, pitch, glyph height) for signs drawn `size` pixels wide (supersampled size).

    Text is set in fixed-pitch slots: character i of an n-letter word is centred in slot i of n
    slots centred on the board, whatever the word. A letter's image then depends only on the
    letter, its index and the word's length, so a model learns glyphs shared across words instead
    of memorising each word as a picture. The font is the largest whose widest capital fits a slot
    of the longest word (letters of WORDS).
    """
    bx0, by0, bx1, by1 = BOARD
    max_w, max_h = (bx1 - bx0) * size * 0.92, (by1 - by0) * size * 0.85
    longest = max(len(w) for w in WORDS)
    pixels = max(4, round(TEXT_HEIGHT * size))
    while True:
        font = _font(pixels)
        stroke = _stroke(font)
        boxes = [font.getbbox(c, stroke_width=stroke) for c in sorted(set("".join(WORDS)))]
        pitch = max(b[2] - b[0] for b in boxes) * 0.92  # the widest letters may just touch
        height = max(b[3] for b in boxes) - min(b[1] for b in boxes)
        if (pitch * longest <= max_w and height <= max_h) or pixels <= 4:
            return font, pitch, height
        pixels -= 1


def _slots(word: str, size: int) -> list[tuple[float, float]]:
    """Centre (x, y) of each character's slot, in pixels of an image `size` wide."""
    _, pitch, _ = _text_font(size)
    bx0, by0, bx1, by1 = (v * size for v in BOARD)
    cx, cy = (bx0 + bx1) / 2, (by0 + by1) / 2
    return [(cx + (i - (len(word) - 1) / 2) * pitch, cy) for i in range(len(word))]


def _sign_layout(word: str, size: int) -> list[Box]:
    bx0, by0, bx1, by1 = (v * size for v in BOARD)
    _, pitch, height = _text_font(size * SUPERSAMPLE)
    pitch, height = pitch / SUPERSAMPLE, height / SUPERSAMPLE
    cx, cy = (bx0 + bx1) / 2, (by0 + by1) / 2
    w = pitch * len(word)
    px0, py0, px1, py1 = (v * size for v in POST)
    return [
        Box(bx0, by0, bx1, by1, "board"),
        Box(cx - w / 2, cy - height / 2, cx + w / 2, cy + height / 2, "text"),
        Box(px0, py0, px1, py1, "post"),
    ]


def render(scene: Scene, size: int = 64, rng: random.Random | None = None) -> Image.Image:
    """The ground-truth RGB image of a scene. Deterministic given the rng's state (None: no jitter)."""
    big = size * SUPERSAMPLE
    if scene.kind == "sign":
        image = Image.new("RGB", (big, big), SIGN_SKY)
        draw = ImageDraw.Draw(image)
        s = SUPERSAMPLE
        board, _, post = _sign_layout(scene.word, size)
        draw.rectangle([post.x0 * s, post.y0 * s, post.x1 * s - 1, post.y1 * s - 1], fill=SIGN_POST)
        draw.rectangle([board.x0 * s, board.y0 * s, board.x1 * s - 1, board.y1 * s - 1], fill=SIGN_BOARD)
        font, _, _ = _text_font(big)
        for char, (x, y) in zip(scene.word, _slots(scene.word, big)):
            draw.text(
                (x, y), char, font=font, anchor="mm", fill=SIGN_INK, stroke_width=_stroke(font), stroke_fill=SIGN_INK
            )
        return image.resize((size, size), Image.Resampling.BOX)
    background = BACKGROUND_COLORS[scene.background or DEFAULT_BACKGROUND]
    image = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(image)
    fill = COLORS[scene.color]
    for box in layout(scene, size, rng):
        x0, y0, x1, y1 = (v * SUPERSAMPLE for v in (box.x0, box.y0, box.x1, box.y1))
        if scene.shape == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif scene.shape == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        else:  # triangle, apex up
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return image.resize((size, size), Image.Resampling.BOX)
