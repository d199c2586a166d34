"""Captions with the variety people type (issue 27), and the parser that reads them back.

``describe`` says a ``Scene`` in one of many phrasings: word orders, dropped articles,
synonyms and short forms, commas or "and", filler words, upper case, a typo. Its templates
come in two disjoint sets: ``TRAIN_TEMPLATES`` (what the demo model learns from) and
``HELD_OUT_TEMPLATES`` (arrangements of the same words it never saw, to measure whether it
learnt the words rather than the sentences). Every word of a held-out phrasing is also a word
of training: a model cannot learn a word it never saw.

``parse`` is keyword-based: lower case, punctuation out, each unknown word of 4+ letters
corrected to the one known word within one edit, then colours and kinds in order of
appearance, the background's colour the one next to its word.
"""

from __future__ import annotations

import random
import re
from functools import lru_cache

from engine.demo.scenes import COLOURS, RELATIONS, SHAPES, SIDES, Scene, Shape

# What people call each kind; the first is the canonical word.
KINDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "ball", "dot", "disc"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "star": ("star",),
}
BACKGROUNDS = ("background", "bg", "backdrop")
# "first shape REL second shape", always in that order (no "with X below it" reversals).
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": (RELATIONS["left"], "left of", "on the left side of", "on the left of"),
    "right": (RELATIONS["right"], "right of", "on the right side of", "on the right of"),
    "above": ("above", "on top of", "over"),
    "below": ("below", "under", "beneath", "underneath"),
}
SIDE_PHRASES: dict[str, tuple[str, ...]] = {
    "left": (SIDES["left"], "at the left", "left side", "on the left side"),
    "right": (SIDES["right"], "at the right", "right side", "on the right side"),
    "top": (SIDES["top"], "top", "on top", "on the top"),
    "bottom": (SIDES["bottom"], "bottom", "on the bottom", "at the bottom side"),
}
FILLERS = ("please draw ", "a picture of ", "draw me ", "an image of ", "i want ", "draw ",
           "show me ")
# Slots: {f} a filler (or nothing), {a} and {b} the shapes, {r} the relation, {s} the side,
# {g} the background ("a blue background", "green bg", ...). Keyed by the scene's form.
TRAIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "one": ("{f}{a} on {g}", "{f}{a}, {g}", "{f}on {g}, {a}", "{f}{g} with {a}",
            "{f}{a} and {g}"),
    "side": ("{f}{a} {s} on {g}", "{f}{a} {s}, {g}", "{f}on {g}, {a} {s}", "{f}{g} with {a} {s}",
             "{f}{a} {s} and {g}"),
    "two": ("{f}{a} {r} {b} on {g}", "{f}{a} {r} {b}, {g}", "{f}on {g}, {a} {r} {b}",
            "{f}{g} with {a} {r} {b}", "{f}{a} {r} {b} and {g}"),
}
HELD_OUT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "one": ("{g}, {a}", "{f}{a} with {g}", "{g} and {a}"),
    "side": ("{s}, {a} on {g}", "{f}{g}, {a} {s}", "{a} {s} with {g}"),
    "two": ("{g}, {a} {r} {b}", "{f}{a} {r} {b} with {g}", "{g} and {a} {r} {b}"),
}


def _words(*texts: str) -> set[str]:
    return set(re.findall(r"[a-z]+", " ".join(texts).lower()))


def _templates_text(templates: dict[str, tuple[str, ...]]) -> str:
    return re.sub(r"\{\w\}", " ", " ".join(t for group in templates.values() for t in group))


# Every word a phrasing can hold (the scene words included), in a fixed order.
PHRASE_WORDS: tuple[str, ...] = tuple(sorted(_words(
    *COLOURS, *(w for names in KINDS.values() for w in names), *BACKGROUNDS, "a an the",
    *(p for ps in RELATION_PHRASES.values() for p in ps),
    *(p for ps in SIDE_PHRASES.values() for p in ps), *FILLERS,
    _templates_text(TRAIN_TEMPLATES), _templates_text(HELD_OUT_TEMPLATES),
)))
# The parser's reading of each meaningful word.
_CANONICAL = {name: kind for kind, names in KINDS.items() for name in names} | {
    name: "background" for name in BACKGROUNDS}
_DIRECTIONS = {"left": "left", "right": "right", "above": "above", "over": "above",
               "top": "above", "below": "below", "under": "below", "beneath": "below",
               "underneath": "below", "bottom": "below"}
_SIDES = {"left": "left", "right": "right", "top": "top", "bottom": "bottom"}


def form(scene: Scene) -> str:
    """Which group of templates says ``scene``."""
    if len(scene.shapes) == 2:
        return "two"
    return "one" if scene.side is None else "side"


def describe(scene: Scene, rng: random.Random, *, held_out: bool = False,
             typo_rate: float = 0.0, template: str | None = None) -> str:
    """``scene`` in a phrasing drawn by ``rng`` from the training or the held-out templates
    (``template``: this one instead), with one typo at the rate ``typo_rate``."""
    templates = (HELD_OUT_TEMPLATES if held_out else TRAIN_TEMPLATES)[form(scene)]
    slots = {
        "f": rng.choice(("",) * 3 + FILLERS),
        "a": _shape(scene.shapes[0], rng),
        "b": _shape(scene.shapes[-1], rng),
        "r": rng.choice(RELATION_PHRASES[scene.relation]) if scene.relation else "",
        "s": rng.choice(SIDE_PHRASES[scene.side]) if scene.side else "",
        "g": f"{_article(scene.background, rng, ('a ', ''))}{scene.background} "
             f"{rng.choice(BACKGROUNDS)}",
    }
    text = (template or rng.choice(templates)).format(**slots)
    if rng.random() < typo_rate:
        text = _with_typo(text, rng)
    if rng.random() < 0.2:
        text += "."
    return _cased(text, rng)


def _shape(shape: Shape, rng: random.Random) -> str:
    article = _article(shape.colour, rng, ("a ", "", "the "))
    return f"{article}{shape.colour} {rng.choice(KINDS[shape.kind])}"


def _article(word: str, rng: random.Random, choices: tuple[str, ...]) -> str:
    """One of ``choices``, "a" said "an" before a vowel, as people write it (the grammar's
    captions say "a orange": both are learnt)."""
    article = rng.choice(choices)
    return "an " if article == "a " and word[0] in "aeiou" else article


def _cased(text: str, rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.1:
        return text.upper()
    return text[:1].upper() + text[1:] if roll < 0.4 else text


def _with_typo(text: str, rng: random.Random) -> str:
    """``text`` with one word of 4+ letters mistyped (a letter dropped, two swapped, one
    doubled or replaced), a mistake the parser corrects back; as it was when none is found."""
    places = list(re.finditer(r"[a-z]{4,}", text))
    for _ in range(10):
        if not places:
            break
        found = rng.choice(places)
        wrong = _mistype(found.group(), rng)
        if correct(wrong) == found.group() != wrong:
            return text[:found.start()] + wrong + text[found.end():]
    return text


def _mistype(word: str, rng: random.Random) -> str:
    at = rng.randrange(len(word) - 1)
    # A dropped letter only from 5+ letters: the typo'd word stays 4+ letters, which is what
    # the parser corrects.
    kind = rng.choice(("drop", "swap", "double", "replace") if len(word) >= 5
                      else ("swap", "double", "replace"))
    if kind == "drop":
        return word[:at] + word[at + 1:]
    if kind == "swap":
        return word[:at] + word[at + 1] + word[at] + word[at + 2:]
    if kind == "double":
        return word[:at] + word[at] + word[at:]
    return word[:at] + rng.choice("abcdefghijklmnopqrstuvwxyz") + word[at + 1:]


def _one_edit(a: str, b: str) -> bool:
    """Whether ``a`` becomes ``b`` by one letter dropped, added, replaced or two swapped."""
    if len(a) > len(b):
        a, b = b, a
    if len(b) - len(a) == 1:
        return any(a == b[:i] + b[i + 1:] for i in range(len(b)))
    if len(a) != len(b):
        return False
    diffs = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
    swapped = len(diffs) == 2 and diffs[1] == diffs[0] + 1 and a[diffs[0]] == b[diffs[1]] and (
        a[diffs[1]] == b[diffs[0]])
    return len(diffs) == 1 or swapped


_LONG_WORDS = tuple(w for w in PHRASE_WORDS if len(w) >= 4)


@lru_cache(maxsize=8192)
def correct(word: str) -> str:
    """``word`` (lower case), or the one known word of 4+ letters one edit away from it."""
    if len(word) < 4 or word in PHRASE_WORDS:
        return word
    near = [w for w in _LONG_WORDS if _one_edit(word, w)]
    return near[0] if len(near) == 1 else word


def parse(text: str) -> Scene | None:
    """The scene ``text`` describes in any phrasing ``describe`` makes or the old grammar,
    anywhere in the text (a styled prompt too), or None when it describes none of ours."""
    words = [_CANONICAL.get(w, w) for w in map(correct, re.findall(r"[a-z]+", text.lower()))]
    bg = _background_at(words)
    if bg is None:
        return None
    colours = [i for i, w in enumerate(words) if w in COLOURS and i != bg]
    kinds = [i for i, w in enumerate(words) if w in SHAPES]
    # Each shape said as "colour kind"; one or two of them.
    if len(kinds) not in (1, 2) or [i + 1 for i in colours] != kinds:
        return None
    shapes = tuple(Shape(words[c], words[k]) for c, k in zip(colours, kinds, strict=True))
    if len(shapes) == 2:
        between = words[kinds[0] + 1:colours[1]]
        relation = next((_DIRECTIONS[w] for w in between if w in _DIRECTIONS), None)
        return None if relation is None else Scene(words[bg], shapes, relation)
    side = next((_SIDES[w] for w in words if w in _SIDES), None)
    return Scene(words[bg], shapes, side=side)


def _background_at(words: list[str]) -> int | None:
    """Where the background's colour is: right before its word, else right after it; with no
    such word, the colour after a leading "on" ("on green, a blue square")."""
    for i, word in enumerate(words):
        if word != "background":
            continue
        for at in (i - 1, i + 1):
            if 0 <= at < len(words) and words[at] in COLOURS:
                return at
    if "background" not in words and words[:1] == ["on"]:
        at = 2 if words[1:2] in (["a"], ["an"]) else 1
        return at if words[at:at + 1] and words[at] in COLOURS else None
    return None
