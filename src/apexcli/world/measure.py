"""Read a shapes image back from its pixels: background, object colour, count, position, shape.

    background  the background palette colour nearest the median of the border pixels
    foreground  pixels farther than FG_DISTANCE (RGB) from that background colour
    colour      the object palette colour nearest the most foreground pixels (majority vote)
    count       connected components of the foreground of at least MIN_AREA of an object's area
    position    `position_of` the foreground centroid (the layout's own classifier)
    shape       from the mean fill ratio of the components, area / bounding-box area:
                square ~1.0, circle ~pi/4 = 0.785, triangle ~0.5 (nearest of the three)

`attribute_matches(scene, reading)` compares the attributes the prompt states; their mean is a
graded adherence score in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from apexcli.world.grammar import BACKGROUND_COLORS, COLORS, Scene
from apexcli.world.render import OBJECT_SIZE, position_of

FG_DISTANCE = 60.0
MIN_AREA = 0.25  # of one object's nominal area
FILL = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5}


@dataclass(frozen=True)
class Reading:
    background: str
    color: str | None  # None: no foreground at all
    count: int
    position: str | None
    shape: str | None


def _nearest(pixels: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> np.ndarray:
    """Index into the palette of the nearest colour, for each pixel of an [..., 3] array."""
    colours = np.asarray(list(palette.values()), dtype=np.float32)
    return np.argmin(((pixels[..., None, :].astype(np.float32) - colours) ** 2).sum(-1), axis=-1)


def read_shapes(image: Image.Image) -> Reading:
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    size = pixels.shape[0]
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    bg_name = list(BACKGROUND_COLORS)[int(_nearest(np.median(border, axis=0), BACKGROUND_COLORS))]
    bg = np.asarray(BACKGROUND_COLORS[bg_name], dtype=np.float32)
    fg = np.sqrt(((pixels - bg) ** 2).sum(-1)) > FG_DISTANCE
    if not fg.any():
        return Reading(bg_name, None, 0, None, None)
    votes = np.bincount(_nearest(pixels[fg], COLORS), minlength=len(COLORS))
    color = list(COLORS)[int(votes.argmax())]
    n, _, stats, _ = cv2.connectedComponentsWithStats(fg.astype(np.uint8), connectivity=8)
    object_area = (OBJECT_SIZE * size) ** 2
    parts = [stats[i] for i in range(1, n) if stats[i][cv2.CC_STAT_AREA] >= MIN_AREA * object_area]
    ys, xs = np.nonzero(fg)
    position = position_of(xs.mean() + 0.5, ys.mean() + 0.5, size)
    shape = None
    if parts:
        fill = np.mean([p[cv2.CC_STAT_AREA] / (p[cv2.CC_STAT_WIDTH] * p[cv2.CC_STAT_HEIGHT]) for p in parts])
        shape = min(FILL, key=lambda s: abs(FILL[s] - fill))
    return Reading(bg_name, color, len(parts), position, shape)


def attribute_matches(scene: Scene, reading: Reading) -> dict[str, bool]:
    """Which of the scene's stated attributes the reading satisfies (unstated ones are left out)."""
    matches = {
        "color": reading.color == scene.color,
        "shape": reading.shape == scene.shape,
        "count": reading.count == scene.count,
    }
    if scene.position is not None:
        matches["position"] = reading.position == scene.position
    if scene.background is not None:
        matches["background"] = reading.background == scene.background
    return matches
