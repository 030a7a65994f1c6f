"""The procedural world: grammar round trips, determinism, renders' colours and positions, and
real OCR reading ground-truth signs."""

import random

import numpy as np
import pytest

from apexcli.world.grammar import (
    BACKGROUND_COLORS,
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SHAPES,
    WORD_LETTERS,
    WORDS,
    Scene,
    mislabel,
    parse_prompt,
    prompts,
    sample_scene,
    scene_to_prompt,
    split_of,
)
from apexcli.world.render import layout, position_of, render


def test_vocabularies_are_large_enough():
    assert len(COLORS) >= 6 and len(SHAPES) >= 3 and len(POSITIONS) >= 5 and len(BACKGROUNDS) >= 3
    assert len(WORDS) >= 24 and len(set(WORDS)) == len(WORDS)
    assert all(w.isupper() and 3 <= len(w) <= 4 for w in WORDS)


def test_every_sampled_prompt_parses_back_to_its_scene():
    rng = random.Random(0)
    for _ in range(500):
        scene = sample_scene(rng, sign_fraction=0.4)
        assert parse_prompt(scene_to_prompt(scene)) == scene


def test_partial_and_foreign_prompts():
    assert parse_prompt("a red circle") == Scene(kind="shapes", shape="circle", color="red", count=1)
    assert parse_prompt("two blue squares on black") == Scene(
        kind="shapes", shape="square", color="blue", count=2, background="black"
    )
    assert parse_prompt('a sign that says "CAT"') == Scene(kind="sign", word="CAT")
    for foreign in [
        "a red apple on a wooden table",
        "two red circle",
        "a red circles",
        "a pink circle",
        "",
        'a sign "CAT"',
    ]:
        assert parse_prompt(foreign) is None, foreign
    with pytest.raises(ValueError, match="unknown position"):
        Scene(kind="shapes", shape="circle", color="red", position="upside")


def test_prompts_are_deterministic_and_eval_is_held_out():
    train = prompts(400, seed=3, split="train")
    assert train == prompts(400, seed=3, split="train")
    assert train != prompts(400, seed=4, split="train")
    evals = prompts(400, seed=3, split="eval")
    shapes_train = {p for p in train if "sign" not in p}
    shapes_eval = {p for p in evals if "sign" not in p}
    assert shapes_eval and shapes_train and not shapes_train & shapes_eval
    assert all(split_of(parse_prompt(p)) == "eval" for p in shapes_eval)
    signs = [p for p in evals if "sign" in p]
    assert 0.35 < len(signs) / len(evals) < 0.65  # default sign_fraction 0.5


def _nearest_palette(pixel, palette):
    return min(palette, key=lambda name: sum((int(a) - b) ** 2 for a, b in zip(pixel, palette[name])))


def test_render_puts_the_right_colours_where_the_layout_says():
    scene = Scene(kind="shapes", shape="square", color="green", count=3, position="left", background="black")
    rng_a, rng_b = random.Random(5), random.Random(5)
    image = render(scene, 64, rng_a)
    assert image.size == (64, 64) and image.mode == "RGB"
    assert np.array_equal(np.asarray(image), np.asarray(render(scene, 64, random.Random(5))))  # deterministic
    boxes = layout(scene, 64, rng_b)  # same rng state -> the boxes render drew
    assert len(boxes) == 3 and all(b.label == "square" for b in boxes)
    pixels = np.asarray(image)
    for box in boxes:
        cx, cy = box.center
        assert _nearest_palette(pixels[int(cy), int(cx)], COLORS) == "green"
    assert position_of(np.mean([b.center[0] for b in boxes]), np.mean([b.center[1] for b in boxes]), 64) == "left"
    assert _nearest_palette(pixels[32, 60], BACKGROUND_COLORS) == "black"  # right side is background
    # the green pixels' centroid is on the left, and their area is about three 0.22-side squares
    green = np.all(np.abs(pixels.astype(int) - COLORS["green"]) < 30, axis=-1)
    ys, xs = np.nonzero(green)
    assert xs.mean() < 24 and 0.8 < green.sum() / (3 * (0.22 * 64) ** 2) < 1.2


@pytest.mark.parametrize("position", POSITIONS)
def test_layout_positions_classify_back(position):
    for count in (1, 2, 3):
        scene = Scene(kind="shapes", shape="circle", color="red", count=count, position=position)
        xs = [b.center[0] for b in layout(scene, 64)]
        ys = [b.center[1] for b in layout(scene, 64)]
        assert position_of(np.mean(xs), np.mean(ys), 64) == position


def test_sign_layout_and_ink():
    scene = Scene(kind="sign", word="STOP")
    board, text, post = layout(scene, 64)
    assert (board.label, text.label, post.label) == ("board", "text", "post")
    assert board.x0 <= text.x0 < text.x1 <= board.x1 and board.y0 <= text.y0 < text.y1 <= board.y1
    assert text.x1 - text.x0 > 30  # large glyphs: the word spans about half the image
    pixels = np.asarray(render(scene, 64)).astype(int)
    inside = pixels[int(text.y0) : int(text.y1), int(text.x0) : int(text.x1)]
    dark = (inside.sum(-1) < 150).mean()
    assert 0.15 < dark < 0.7  # ink, not an empty board nor a black box


def test_rapidocr_reads_ground_truth_signs(rapidocr):
    words = ["CAT", "STOP", "FISH", "ZOO"]
    images = [render(Scene(kind="sign", word=w), 64) for w in words]
    scores, info = rapidocr(images, [f'a sign that says "{w}"' for w in words])
    assert scores.tolist() == [1.0] * len(words), info["text"]
    # the same render against another word's prompt is not rewarded
    wrong, _ = rapidocr(images[:1], ['a sign that says "MILK"'])
    assert wrong.item() < 0.5


def test_shipped_prompt_sets_are_the_grammars_output():
    from importlib import resources

    def lines(name):
        text = (resources.files("apexcli.data") / f"{name}.txt").read_text()
        return [x for x in text.splitlines() if x and not x.startswith("#")]

    assert lines("mini") == prompts(256, 0, "train")
    assert lines("mini_eval") == prompts(64, 0, "eval")
    assert lines("mini_eval_large") == prompts(320, 0, "eval")


def test_single_objective_prompt_sets_split_the_mini_sets_by_kind():
    from apexcli.prompts import load_prompts

    for split in ("", "_eval", "_eval_large"):
        signs, shapes = load_prompts(f"builtin:mini_signs{split}"), load_prompts(f"builtin:mini_shapes{split}")
        assert all(parse_prompt(p).kind == "sign" for p in signs)
        assert all(parse_prompt(p).kind == "shapes" for p in shapes)
        assert sorted(signs + shapes) == sorted(load_prompts(f"builtin:mini{split}"))


def test_pixel_readback_of_ground_truth_and_of_a_wrong_prompt():
    from apexcli.world.measure import attribute_matches, read_shapes

    rng = random.Random(2)
    for _ in range(60):
        scene = sample_scene(rng, sign_fraction=0.0)
        matches = attribute_matches(scene, read_shapes(render(scene, 64, rng)))
        assert all(matches.values()), (scene_to_prompt(scene), matches)
    image = render(parse_prompt("a red circle on the left on white"))
    matches = attribute_matches(parse_prompt("two blue squares on the right on black"), read_shapes(image))
    assert not any(matches.values()), matches
    blank = render(Scene(kind="shapes", shape="circle", color="red", count=1)).copy()
    blank.paste((245, 245, 245), (0, 0, 64, 64))
    assert read_shapes(blank).count == 0 and read_shapes(blank).color is None


def test_mislabel_changes_attributes_at_the_stated_rates():
    rng = random.Random(3)
    scenes = [sample_scene(rng, sign_fraction=0.5) for _ in range(4000)]
    assert mislabel(scenes[0], random.Random(0), 0.0, 0.0) == scenes[0]
    noisy = [mislabel(s, rng, attribute_noise=0.3, letter_noise=0.15) for s in scenes]
    changed: dict[str, list[bool]] = {}
    for clean, shown in zip(scenes, noisy):
        assert shown.kind == clean.kind
        if clean.kind == "sign":
            assert len(shown.word) == len(clean.word) and set(shown.word) <= set(WORD_LETTERS)
            changed.setdefault("letter", []).extend(a != b for a, b in zip(clean.word, shown.word))
        else:
            for name in ("shape", "color", "count", "position", "background"):
                changed.setdefault(name, []).append(getattr(clean, name) != getattr(shown, name))
    rates = {name: np.mean(flags) for name, flags in changed.items()}
    # a changed attribute always differs (never redrawn as itself), so the rates are the noise levels
    assert rates.pop("letter") == pytest.approx(0.15, abs=0.02)
    assert all(r == pytest.approx(0.3, abs=0.03) for r in rates.values()), rates


def test_the_shipped_halves_of_the_mini_sets_are_their_sign_and_shape_prompts():
    # builtin:mini_signs etc. ship as files, so loading prompts needs no grammar; they must stay
    # exactly the grammar's split of their source set, in order
    from apexcli.prompts import load_prompts
    from apexcli.world import parse_prompt

    for source in ("mini", "mini_eval", "mini_eval_large"):
        prompts = load_prompts(f"builtin:{source}")
        for kind, half in (("sign", "signs"), ("shapes", "shapes")):
            name = source.replace("mini", f"mini_{half}", 1)
            expected = [p for p in prompts if (scene := parse_prompt(p)) is not None and scene.kind == kind]
            assert load_prompts(f"builtin:{name}") == expected, name
