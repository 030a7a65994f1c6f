"""The miniature world's prompt grammar: coloured shapes and signs, deterministic from a seed.

Two kinds of scene:

    shapes  "{count} {color} {shape}[s] {position} on {background}"
            e.g. "a red circle on the left on white", "three blue squares at the top on gray"
    sign    'a sign that says "{WORD}"'   (white board, black capitals, on a sky-blue background)

`parse_prompt` inverts `scene_to_prompt` and also accepts a shapes prompt without its position
and/or background clause ("a red circle", "two blue squares on black"): those attributes are then
None (unspecified), a reward checks only what the prompt states, and `render` uses the defaults.

Held-out split: a shapes scene belongs to the eval split when a stable hash of its prompt falls
in one bucket of eight, so evaluation sees attribute combinations the pretraining never saw.
Sign prompts are shared by both splits (a 24-word vocabulary cannot be held out and still be
written); their evaluation differs by seeds only.
"""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass
from typing import Literal

# Saturated object colours, far apart in RGB so a pixel's nearest colour is unambiguous.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 180),
}
# Background colours: neutral so every object colour stands out on every background.
BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
BACKGROUNDS: tuple[str, ...] = tuple(BACKGROUND_COLORS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
COUNT_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three"}
# Short words in capitals: three or four letters so the glyphs can be large at 64 px.
WORDS: tuple[str, ...] = (
    "CAT",
    "DOG",
    "SUN",
    "BOX",
    "CUP",
    "HAT",
    "MAP",
    "PEN",
    "BUS",
    "CAR",
    "FOX",
    "EGG",
    "KEY",
    "SKY",
    "ZOO",
    "RUN",
    "STOP",
    "OPEN",
    "FISH",
    "BOOK",
    "MILK",
    "LAMP",
    "TREE",
    "BIRD",
)
# Sign scenes: fixed board, ink and sky colours (the prompt names only the word).
SIGN_BOARD = (250, 250, 250)
SIGN_INK = (10, 10, 10)
SIGN_SKY = (110, 170, 230)
SIGN_POST = (120, 80, 40)

DEFAULT_POSITION = "center"
DEFAULT_BACKGROUND = "white"
EVAL_BUCKETS = 8  # one bucket in eight of the shapes prompts is held out for evaluation


@dataclass(frozen=True)
class Scene:
    """One prompt's content. Shapes: shape, color, count, position, background (position and
    background may be None = unspecified by the prompt). Signs: word."""

    kind: Literal["shapes", "sign"]
    shape: str | None = None
    color: str | None = None
    count: int = 1
    position: str | None = None
    background: str | None = None
    word: str | None = None

    def __post_init__(self) -> None:
        if self.kind == "sign":
            if self.word is None or not re.fullmatch(r"[A-Z0-9]{1,8}", self.word):
                raise ValueError(f"a sign needs a word of 1-8 capitals or digits, got {self.word!r}")
        elif self.kind == "shapes":
            if self.shape not in SHAPES or self.color not in COLORS or self.count not in COUNT_WORDS:
                raise ValueError(f"invalid shapes scene: {self.shape!r} {self.color!r} x{self.count}")
            if self.position is not None and self.position not in POSITIONS:
                raise ValueError(f"unknown position {self.position!r}; valid: {', '.join(POSITIONS)}")
            if self.background is not None and self.background not in BACKGROUND_COLORS:
                raise ValueError(f"unknown background {self.background!r}; valid: {', '.join(BACKGROUNDS)}")
        else:
            raise ValueError(f"scene kind must be 'shapes' or 'sign', got {self.kind!r}")


def sample_scene(rng: random.Random, sign_fraction: float = 0.5) -> Scene:
    """A fully specified random scene (every attribute set)."""
    if rng.random() < sign_fraction:
        return Scene(kind="sign", word=rng.choice(WORDS))
    return Scene(
        kind="shapes",
        shape=rng.choice(SHAPES),
        color=rng.choice(list(COLORS)),
        count=rng.randint(1, 3),
        position=rng.choice(POSITIONS),
        background=rng.choice(BACKGROUNDS),
    )


# The letters the words use: a mislabelled sign swaps in one of these, so its glyphs stay ones
# the model draws anyway.
WORD_LETTERS: tuple[str, ...] = tuple(sorted(set("".join(WORDS))))


def mislabel(scene: Scene, rng: random.Random, attribute_noise: float, letter_noise: float) -> Scene:
    """The scene a noisy caption of `scene` may show: web captions are often wrong, and this is
    what makes a model follow prompts only partly. Each stated attribute of a shapes scene
    (shape, colour, count, position, background) is, with probability `attribute_noise`, replaced
    by another value; each letter of a sign, with probability `letter_noise`, by another letter."""
    if scene.kind == "sign":
        letters = [
            rng.choice([c for c in WORD_LETTERS if c != ch]) if rng.random() < letter_noise else ch for ch in scene.word
        ]
        return Scene(kind="sign", word="".join(letters))

    def other(value, choices):
        if value is None or rng.random() >= attribute_noise:
            return value
        return rng.choice([c for c in choices if c != value])

    return Scene(
        kind="shapes",
        shape=other(scene.shape, SHAPES),
        color=other(scene.color, tuple(COLORS)),
        count=other(scene.count, tuple(COUNT_WORDS)),
        position=other(scene.position, POSITIONS),
        background=other(scene.background, BACKGROUNDS),
    )


def scene_to_prompt(scene: Scene) -> str:
    if scene.kind == "sign":
        return f'a sign that says "{scene.word}"'
    noun = scene.shape + ("s" if scene.count > 1 else "")
    text = f"{COUNT_WORDS[scene.count]} {scene.color} {noun}"
    if scene.position is not None:
        text += " " + POSITION_PHRASES[scene.position]
    if scene.background is not None:
        text += f" on {scene.background}"
    return text


_SIGN_RE = re.compile(r'a sign that says "([A-Z0-9]{1,8})"')
_SHAPES_RE = re.compile(
    r"(?P<count>a|two|three) (?P<color>{colors}) (?P<shape>{shapes})(?P<plural>s?)"
    r"(?: (?P<position>{positions}))?(?: on (?P<background>{backgrounds}))?".format(
        colors="|".join(COLORS),
        shapes="|".join(SHAPES),
        positions="|".join(POSITION_PHRASES.values()),
        backgrounds="|".join(BACKGROUNDS),
    )
)
_COUNT_OF = {w: n for n, w in COUNT_WORDS.items()}
_POSITION_OF = {p: name for name, p in POSITION_PHRASES.items()}


def parse_prompt(prompt: str) -> Scene | None:
    """The scene a prompt of this grammar describes, or None for any other prompt."""
    text = " ".join((prompt or "").split())
    match = _SIGN_RE.fullmatch(text)
    if match:
        return Scene(kind="sign", word=match.group(1))
    match = _SHAPES_RE.fullmatch(text.lower())
    if match is None:
        return None
    count = _COUNT_OF[match.group("count")]
    if (count > 1) != bool(match.group("plural")):
        return None  # "a red circles" / "two red circle"
    position = match.group("position")
    return Scene(
        kind="shapes",
        shape=match.group("shape"),
        color=match.group("color"),
        count=count,
        position=_POSITION_OF[position] if position else None,
        background=match.group("background"),
    )


def split_of(scene: Scene) -> str:
    """'eval' for the held-out shapes combinations, 'train' otherwise; signs are in both ('both')."""
    if scene.kind == "sign":
        return "both"
    bucket = zlib.crc32(scene_to_prompt(scene).encode()) % EVAL_BUCKETS
    return "eval" if bucket == 0 else "train"


def sample_split_scene(rng: random.Random, split: str, sign_fraction: float = 0.5) -> Scene:
    """A random scene from one split (rejection sampling on the stable hash)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if rng.random() < sign_fraction:  # kind first, so the split keeps the sign fraction
        return Scene(kind="sign", word=rng.choice(WORDS))
    while True:
        scene = sample_scene(rng, sign_fraction=0.0)
        if split_of(scene) == split:
            return scene


def prompts(n: int, seed: int = 0, split: str = "train", sign_fraction: float = 0.5) -> list[str]:
    """n prompts of one split, deterministic from the seed. Eval prompts differ from train ones:
    shapes prompts come from held-out combinations, and the eval stream is seeded apart."""
    rng = random.Random(f"apex-world/{split}/{seed}")
    return [scene_to_prompt(sample_split_scene(rng, split, sign_fraction)) for _ in range(n)]
