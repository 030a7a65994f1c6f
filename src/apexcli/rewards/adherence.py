"""Prompt adherence in the miniature world (the PickScore role), computed from the pixels.

The prompt is parsed with the world's grammar (``apexcli.world.parse_prompt``); a prompt outside
the grammar scores NaN (masked by the balancer, like OCR on a prompt without quotes). Each
attribute the prompt states gets a graded score in [0, 1]; a is their mean, and

    adherence = 16 + 8 · a          (16: nothing asked for is there; 24: everything is)

mirroring PickScore's 100·cos scale (unrelated images ≈ 16–18, good matches ≈ 22–24).

Shapes prompts ("two blue squares on the left on white"). Pixels are labelled with their nearest
palette colour (the six object colours and three backgrounds; a pixel farther than 0.35 in RGB
from every entry is unlabelled). M = pixels labelled with the prompt's colour; the objects are
its 8-connected components of at least A_min = 0.15·s² pixels, s = the rendered object side
(0.22 of the image side, ``apexcli.world.render.OBJECT_SIZE``); n = their number.

    colour      min(1, |M| / (0.35 s²))                         the colour is there
    count       max(0, 1 − |n − count| / count)                  graded: one off of three = 2/3
    shape       mean over the n objects of p(shape | fill), fill = area / bounding-box area,
                p ∝ exp(−(fill − f_shape)² / (2·0.07²)) over f = circle π/4, square 1, triangle 1/2
    position    (if stated) soft version of ``render.position_of`` at M's centroid (dx, dy from
                the centre, m = max(|dx|, |dy|), σ(z) = 1/(1+e^(−z/0.03))):
                center σ(0.125 − m); left (1 − center)·σ(|dx| − |dy|)·σ(−dx); right, top,
                bottom alike
    background  (if stated) p(background | border colour), p ∝ exp(−d² / (2·0.15²)) over the
                three backgrounds, d = RGB distance to the image border's median colour

Sign prompts ('a sign that says "CAT"'); what the word reads is the OCR reward's job:

    board       min(1, |board-white pixels| / (0.6 · rendered board area))
    writing     min(1, |ink-dark pixels inside the board's box| / (0.5 · rendered ink area))
                (the rendered areas are those of the world's ground truth for that word)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch

from apexcli.rewards.base import ImageBatch, Reward
from apexcli.rewards.pixels import (
    batched,
    border_color,
    component_stats,
    connected_components,
    nearest_palette,
)
from apexcli.world import grammar
from apexcli.world.render import OBJECT_SIZE
from apexcli.world.render import render as render_scene

LOW, HIGH = 16.0, 24.0
UNLABELLED = 0.35  # RGB distance (0-1 scale) beyond which a pixel has no palette colour
FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
FILL_SIGMA = 0.07
POS_T = 0.03
BG_SIGMA = 0.15


@lru_cache(maxsize=8)
def _palette() -> tuple[list[str], torch.Tensor, list[str], torch.Tensor]:
    names = list(grammar.COLORS) + list(grammar.BACKGROUND_COLORS)
    rgb = [grammar.COLORS.get(n) or grammar.BACKGROUND_COLORS[n] for n in names]
    bgs = list(grammar.BACKGROUND_COLORS)
    bg_rgb = [grammar.BACKGROUND_COLORS[n] for n in bgs]
    return names, torch.tensor(rgb, dtype=torch.float32) / 255, bgs, torch.tensor(bg_rgb, dtype=torch.float32) / 255


@lru_cache(maxsize=64)
def _sign_reference(word: str, size: int) -> tuple[float, float]:
    """(board-white pixels, ink pixels inside the board) of the world's ground truth for `word`."""
    from apexcli.rewards.base import pil_to_tensor

    img = pil_to_tensor(render_scene(grammar.Scene(kind="sign", word=word), size=size)).unsqueeze(0)
    board, ink, _ = _sign_masks(img)
    return float(board.sum()), float(ink.sum())


def _sign_masks(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Board-white mask, ink mask restricted to the board's bounding box, board box present [B]."""
    pal = (
        torch.tensor([grammar.SIGN_BOARD, grammar.SIGN_INK, grammar.SIGN_SKY, grammar.SIGN_POST], dtype=torch.float32)
        / 255
    )
    index, dist = nearest_palette(images, pal)
    ok = dist < UNLABELLED
    board = (index == 0) & ok
    ink = (index == 1) & ok
    b, h, w = board.shape
    rows, cols = board.any(dim=2), board.any(dim=1)  # [B,H], [B,W]
    ar_h, ar_w = torch.arange(h), torch.arange(w)
    y0 = torch.where(rows, ar_h, h).min(dim=1).values
    y1 = torch.where(rows, ar_h, -1).max(dim=1).values
    x0 = torch.where(cols, ar_w, w).min(dim=1).values
    x1 = torch.where(cols, ar_w, -1).max(dim=1).values
    inside = (
        (ar_h.view(1, h, 1) >= y0.view(b, 1, 1))
        & (ar_h.view(1, h, 1) <= y1.view(b, 1, 1))
        & (ar_w.view(1, 1, w) >= x0.view(b, 1, 1))
        & (ar_w.view(1, 1, w) <= x1.view(b, 1, 1))
    )
    return board, ink & inside, rows.any(dim=1)


def _soft(z: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(z / POS_T)


def position_scores(cx: torch.Tensor, cy: torch.Tensor) -> dict[str, torch.Tensor]:
    """Soft membership of centroids (fractions of the side) in each position word; mirrors
    ``apexcli.world.render.position_of`` (the hard version) and sums to ≈ 1."""
    dx, dy = cx - 0.5, cy - 0.5
    m = torch.maximum(dx.abs(), dy.abs())
    center = _soft(0.125 - m)
    horizontal = _soft(dx.abs() - dy.abs())
    rest = 1 - center
    return {
        "center": center,
        "left": rest * horizontal * _soft(-dx),
        "right": rest * horizontal * _soft(dx),
        "top": rest * (1 - horizontal) * _soft(-dy),
        "bottom": rest * (1 - horizontal) * _soft(dy),
    }


def shape_probabilities(fill: torch.Tensor) -> dict[str, torch.Tensor]:
    """p(shape | fill ratio) for every shape, Gaussian around each shape's ideal fill."""
    names = list(FILL)
    logits = torch.stack([-((fill - FILL[n]) ** 2) / (2 * FILL_SIGMA**2) for n in names])
    probs = logits.softmax(dim=0)
    return {n: probs[i] for i, n in enumerate(names)}


def adherence_parts(images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """a in [0,1] per image (NaN for prompts outside the grammar) and each image's attribute scores."""
    b, _, h, w = images.shape
    scenes = [grammar.parse_prompt(p) for p in prompts]
    a = torch.full((b,), math.nan)
    parts: list[dict[str, float]] = [{} for _ in range(b)]
    shape_idx = [i for i, s in enumerate(scenes) if s is not None and s.kind == "shapes"]
    sign_idx = [i for i, s in enumerate(scenes) if s is not None and s.kind == "sign"]
    if shape_idx:
        _score_shapes(images[shape_idx], [scenes[i] for i in shape_idx], shape_idx, a, parts)
    if sign_idx:
        imgs = images[sign_idx]
        board, ink, _ = _sign_masks(imgs)
        n_board, n_ink = board.flatten(1).sum(dim=1).tolist(), ink.flatten(1).sum(dim=1).tolist()
        for j, i in enumerate(sign_idx):
            ref_board, ref_ink = _sign_reference(scenes[i].word, h)
            s_board = min(1.0, n_board[j] / (0.6 * ref_board))
            s_ink = min(1.0, n_ink[j] / (0.5 * max(ref_ink, 1.0)))
            parts[i] = {"board": s_board, "writing": s_ink}
            a[i] = (s_board + s_ink) / 2
    return a, parts


def _score_shapes(images, scenes, where, a, parts) -> None:
    names, pal, bg_names, bg_pal = _palette()
    b, _, h, w = images.shape
    side = OBJECT_SIZE * h
    index, dist = nearest_palette(images, pal)
    target = torch.tensor([names.index(s.color) for s in scenes]).view(b, 1, 1)
    mask = (index == target) & (dist < UNLABELLED)
    area = mask.flatten(1).sum(dim=1).float()
    s_colour = (area / (0.35 * side**2)).clamp(max=1.0)

    comps = component_stats(connected_components(mask))
    counted = comps.area >= 0.15 * side**2
    n = counted.sum(dim=1).float()
    want = torch.tensor([float(s.count) for s in scenes])
    s_count = (1 - (n - want).abs() / want).clamp(min=0)
    probs = shape_probabilities(comps.fill)
    p_target = torch.stack([probs[s.shape][j] for j, s in enumerate(scenes)])
    s_shape = (p_target * counted).sum(dim=1) / n.clamp(min=1)

    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    mf = mask.float()
    cx = (mf.sum(dim=1) * xs).sum(dim=1) / area.clamp(min=1)
    cy = (mf.sum(dim=2) * ys).sum(dim=1) / area.clamp(min=1)
    pos = position_scores(cx, cy)

    d2 = (border_color(images).unsqueeze(1) - bg_pal.unsqueeze(0)).square().sum(dim=2)  # [B,3]
    p_bg = (-d2 / (2 * BG_SIGMA**2)).softmax(dim=1)

    for j, scene in enumerate(scenes):
        got = {"colour": float(s_colour[j]), "count": float(s_count[j]), "shape": float(s_shape[j])}
        if scene.position is not None:
            got["position"] = float(pos[scene.position][j]) if area[j] > 0 else 0.0
        if scene.background is not None:
            got["background"] = float(p_bg[j, bg_names.index(scene.background)])
        parts[where[j]] = got
        a[where[j]] = sum(got.values()) / len(got)


def adherence(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """16 + 8·a per image, [B]; NaN where the prompt is not of the world's grammar."""
    a, _ = adherence_parts(images, prompts)
    return LOW + (HIGH - LOW) * a


class Adherence(Reward):
    name = "adherence"
    needs_prompt = True

    def __init__(self, *_: Any, **__: Any):
        self.batch_size = 256

    def score(self, batch: ImageBatch, prompts: list[str]) -> tuple[torch.Tensor, dict[str, Any]]:
        return batched(adherence, batch, prompts), {}
