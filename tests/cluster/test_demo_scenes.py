"""The demo model's scenes and the adherence scorer: captions parse back to their scenes, the
scorer reads drawn scenes right (in every rendering) and tells a wrong caption from the right
one, so a test that uses it can fail."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from engine.demo.phrasing import (
    BACKGROUNDS,
    FILLERS,
    HELD_OUT_TEMPLATES,
    KINDS,
    RELATION_PHRASES,
    SIDE_PHRASES,
    TRAIN_TEMPLATES,
    correct,
    describe,
    form,
)
from engine.demo.scenes import (
    COLOURS,
    RENDERINGS,
    Scene,
    Shape,
    parse_caption,
    random_scene,
    render,
)
from engine.demo.score import OUTLINE_BELOW, fill_ratio, outlined, read, rendering_of, score


def test_captions_parse_back_to_their_scenes_even_inside_a_styled_prompt() -> None:
    rng = random.Random(3)
    for _ in range(200):
        scene = random_scene(rng, sided=0.5)
        assert parse_caption(scene.caption) == scene
        assert parse_caption(f"watercolor painting of {scene.caption}, soft washes") == scene
    assert parse_caption("a red fox in the snow") is None
    assert parse_caption("a teal circle on a blue background") is None  # not one of ours
    assert Scene("blue", (Shape("red", "circle"), Shape("yellow", "star")), "left").caption == (
        "a red circle to the left of a yellow star on a blue background")


def test_every_phrasing_of_every_template_parses_back_with_and_without_typos() -> None:
    """2000 seeded scenes, each said in every template of its form (training and held-out),
    plain and with a typo, read back to the same scene."""
    rng = random.Random(27)
    said = 0
    for _ in range(2000):
        scene = random_scene(rng, sided=0.5)
        for template in [*TRAIN_TEMPLATES[form(scene)], *HELD_OUT_TEMPLATES[form(scene)]]:
            for typos in (0.0, 1.0):
                text = describe(scene, rng, typo_rate=typos, template=template)
                assert parse_caption(text) == scene, (text, scene)
                said += 1
    assert said == 2000 * 2 * 8


def test_phrasings_vary_as_people_type() -> None:
    """Fillers, synonyms, upper case and typos all turn up, at about the rates asked; the
    held-out templates give other phrasings than the training ones."""
    rng = random.Random(5)
    scenes = [random_scene(rng, sided=0.5) for _ in range(600)]
    train = [describe(s, rng) for s in scenes]
    held = [describe(s, rng, held_out=True) for s in scenes]
    text = " ".join(train).lower()
    for word in ["ball", "box", "bg", "backdrop", "under", "over", "beneath", "please draw",
                 "left side", "top"]:
        assert word in text, word
    assert any(t.isupper() for t in train) and any(t[0].isupper() for t in train)
    assert sum(t.lower() != t for t in train) > 100
    mistyped = [describe(s, random.Random(i), typo_rate=1.0) for i, s in enumerate(scenes)]
    clean = [describe(s, random.Random(i), typo_rate=0.0) for i, s in enumerate(scenes)]
    changed = sum(a != b for a, b in zip(mistyped, clean, strict=True))
    assert changed > 0.9 * len(scenes)
    assert not set(train) & set(held)


def test_held_out_templates_are_new_arrangements_of_trained_words() -> None:
    """No template in both sets, and every word of a held-out phrasing (synonyms, connectors,
    fillers) is one a training phrasing uses: the model is asked to generalise word order,
    not to read words it never saw."""
    for group in TRAIN_TEMPLATES:
        assert not set(TRAIN_TEMPLATES[group]) & set(HELD_OUT_TEMPLATES[group]), group
    rng = random.Random(8)
    seen: set[str] = set()
    held: set[str] = set()
    for _ in range(3000):
        scene = random_scene(rng, sided=0.5)
        seen |= set(describe(scene, rng).lower().replace(",", " ").rstrip(".").split())
        held |= set(describe(scene, rng, held_out=True).lower().replace(",", " ")
                    .rstrip(".").split())
    assert held <= seen, held - seen
    every = {*COLOURS, *(w for ws in KINDS.values() for w in ws), *BACKGROUNDS,
             *(" ".join([*(p for ps in RELATION_PHRASES.values() for p in ps),
                         *(p for ps in SIDE_PHRASES.values() for p in ps), *FILLERS]).split())}
    assert every <= seen, every - seen


def test_the_parser_reads_what_people_type_and_nothing_else() -> None:
    blue_red = Scene("white", (Shape("blue", "square"), Shape("red", "triangle")), "above")
    for text in ["on a white background, a blue square above a red triangle",
                 "Blue box on top of red triangle, white bg",
                 "please draw a blue sqaure over a red triangle and a white backdrop",
                 "WHITE BACKGROUND WITH A BLUE SQUARE ABOVE A RED TRIANGLE"]:
        assert parse_caption(text) == blue_red, text
    assert parse_caption("a red circle left of a yellow star, white background") == Scene(
        "white", (Shape("red", "circle"), Shape("yellow", "star")), "left")
    assert parse_caption("orange star, black background") == Scene(
        "black", (Shape("orange", "star"),))
    assert parse_caption("a green ball at the top, purple bg") == Scene(
        "purple", (Shape("green", "circle"),), side="top")
    assert parse_caption("On green: a blue square above a red triangle") == Scene(
        "green", (Shape("blue", "square"), Shape("red", "triangle")), "above")
    assert parse_caption("an orange ball on a blue background") == Scene(
        "blue", (Shape("orange", "circle"),))
    for text in ["a red fox in the snow", "a teal circle on a blue background",
                 "a red circle and a blue star",
                 "a red circle on a blue background next to a green star",
                 "on the left, a red circle", ""]:
        assert parse_caption(text) is None, text
    assert correct("backgrund") == "background" and correct("purpel") == "purple"
    assert correct("yelow") == "yelow"  # yellow or below: one edit from both, so neither
    assert correct("teal") == "teal" and correct("fox") == "fox"


@pytest.mark.parametrize("style", [None, *RENDERINGS])
def test_the_scorer_reads_drawn_scenes(style: str | None) -> None:
    rng = random.Random(7)
    right: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for i in range(60):
        scene = random_scene(rng, sided=0.5)
        for name, value in score(render(scene, 64, style, seed=i), scene).items():
            if value is not None:
                total[name] += 1
                right[name] += int(value)
    for name in total:
        assert right[name] / total[name] >= 0.93, (name, right[name], total[name])


def test_a_wrong_caption_scores_false_on_what_differs() -> None:
    scene = Scene("blue", (Shape("red", "circle"), Shape("yellow", "square")), "left")
    image = render(scene, 64, None, seed=1)
    assert all(score(image, scene).values())
    assert score(image, Scene("green", scene.shapes, "left"))["background"] is False
    assert score(image, Scene("blue", (Shape("red", "star"), scene.shapes[1]), "left"))[
        "kind"] is False
    assert score(image, Scene("blue", (Shape("purple", "circle"), scene.shapes[1]), "left"))[
        "colour"] is False
    assert score(image, Scene("blue", scene.shapes, "right"))["position"] is False
    assert score(image, Scene("blue", scene.shapes, "above"))["position"] is False
    assert score(image, scene)["axis"] is True
    assert score(image, Scene("blue", scene.shapes, "right"))["axis"] is True  # same axis
    assert score(image, Scene("blue", scene.shapes, "below"))["axis"] is False


def test_a_lone_shape_at_a_named_side() -> None:
    scene = Scene("green", (Shape("white", "star"),), side="left")
    assert scene.caption == "a white star on the left on a green background"
    assert parse_caption(f"pixel art of {scene.caption}") == scene
    image = render(scene, 64, None, seed=4)
    assert all(v for v in score(image, scene).values() if v is not None)
    assert score(image, scene)["position"] is True
    opposite = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
    for side, other in opposite.items():
        drawn = render(Scene("green", scene.shapes, side=side), 64, None, seed=4)
        assert score(drawn, Scene("green", scene.shapes, side=side))["position"] is True, side
        assert score(drawn, Scene("green", scene.shapes, side=other))["position"] is False, side
    middle = Scene("green", scene.shapes)
    assert score(render(middle, 64, None, seed=4), middle)["position"] is None
    # The share asked for, and none when not asked (held-out captions stay as they were).
    rng = random.Random(5)
    sided = [random_scene(rng, two_shapes=0.0, sided=0.5).side for _ in range(400)]
    assert 150 < sum(s is not None for s in sided) < 250
    assert {s for s in sided if s} == {"left", "right", "top", "bottom"}
    assert all(random_scene(rng).side is None for _ in range(200))


def test_noise_shows_no_scene() -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    scene = Scene("blue", (Shape("red", "circle"),))
    assert not all(v for v in score(noise, scene).values() if v is not None)
    assert len(read(noise).shapes) <= len(COLOURS) - 1


def test_the_rendering_of_a_picture_is_told_apart() -> None:
    scene = Scene("blue", (Shape("red", "circle"),))
    for style, expected in [(None, "plain"), *RENDERINGS.items()]:
        assert rendering_of(render(scene, 64, style, seed=2)) == expected, style


def test_outlines_are_told_from_filled_shapes() -> None:
    """What the demo LoRA changes: drawn scenes, one or two shapes of each kind, read as filled
    plain and as outlines in line-art (all but a little star's, too small inside to tell);
    a ring broken by a couple of pixels still reads as an outline; no asked shape, no
    answer."""
    rng = random.Random(11)
    told = 0
    for _ in range(80):
        scene = random_scene(rng, sided=0.3)
        seed = rng.randrange(2**31)
        filled = fill_ratio(render(scene, 64, None, seed=seed), scene)
        ring = fill_ratio(render(scene, 64, "line-art", seed=seed), scene)
        if filled is not None and ring is not None:
            told += 1
            assert filled > 0.95, (scene.caption, filled)
            assert ring < OUTLINE_BELOW - 0.25, (scene.caption, ring)
    assert told >= 70
    scene = Scene("blue", (Shape("red", "circle"),))
    broken = np.array(render(scene, 64, "line-art", seed=2))
    broken[:, 30:32] = COLOURS["blue"]  # two columns of background cut the ring twice
    assert outlined(broken, scene) is True
    assert outlined(render(scene, 64, None, seed=2), scene) is False
    elsewhere = Scene("blue", (Shape("green", "star"),))
    assert outlined(render(scene, 64, None, seed=2), elsewhere) is None


def test_a_scene_drawn_at_128_shows_the_layout_it_shows_at_64() -> None:
    """The grown demo model (issue 27) learnt to draw at 128² what its UNet had learnt at 64²:
    both sizes of one scene and seed read as the same shapes in the same places, in every
    rendering, and a pixel-art cell is 1/32 of the side at both."""
    rng = random.Random(5)
    for i in range(24):
        scene = random_scene(rng, two_shapes=0.5, sided=0.5)
        style = [None, *RENDERINGS][i % 4]
        small, large = render(scene, 64, style, seed=i), render(scene, 128, style, seed=i)
        assert large.size == (128, 128)
        assert all(v is not False for v in score(large, scene).values()), (scene, style)
        # Outlines read as outlines at either size (the scorer's pixel sizes scale with it).
        expected = {True, None} if style == "line-art" else {False}  # None: too small to tell
        assert outlined(large, scene) in expected, (scene, style)
        a, b = read(small), read(large)
        assert a.background == b.background
        for found in a.shapes:
            other = b.shape(found.colour)
            assert other is not None and other.kind == found.kind
            assert abs(other.x - found.x) < 0.03 and abs(other.y - found.y) < 0.03
    pixels = np.asarray(render(Scene("white", (Shape("red", "circle"),)), 128, "pixel-art"))
    columns = np.flatnonzero(np.abs(np.diff(pixels.astype(int), axis=1)).sum(axis=(0, 2)))
    assert all((c + 1) % 4 == 0 for c in columns)  # changes only between 4-pixel cells
