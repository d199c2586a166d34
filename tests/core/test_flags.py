"""Chat flag syntax: each flag, each error, defaults, and the format -> parse round trip."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import InvalidRequest, PromptTooLong
from core.flags import (
    ControlFlags,
    command_limit,
    flags_help,
    format_request,
    parse_command,
    parse_flags,
    size_for_aspect,
)
from core.prompts import normalize
from core.request import MAX_SEED, SCHEDULERS, GenerationRequest
from core.settings import Limits
from core.styles import StyleRegistry, default_registry


def test_the_example_from_the_readme() -> None:
    req = parse_command(
        "a cat --ar 16:9 --seed 42 --steps 20 --cfg 6 --style anime,watercolor "
        "--no blurry --n 4 --raw"
    )
    assert req == GenerationRequest(
        prompt="a cat", width=680, height=384, seed=42, steps=20, guidance=6.0,
        styles=("anime", "watercolor"), negative="blurry", count=4, raw=True,
    )  # fmt: skip


def test_prompt_only_gives_model_defaults() -> None:
    assert parse_command("  a   lighthouse at dusk ") == GenerationRequest(
        prompt="a lighthouse at dusk"
    )


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("--w 768", {"width": 768}),
        ("--width 768 --height 640", {"width": 768, "height": 640}),
        ("--h 640", {"height": 640}),
        ("--seed 0", {"seed": 0}),
        (f"--seed {MAX_SEED}", {"seed": MAX_SEED}),
        ("--seed random", {"seed": None}),
        ("--seed -1", {"seed": None}),
        ("--steps 35", {"steps": 35}),
        ("--cfg 4.5", {"guidance": 4.5}),
        ("--guidance 7,5", {"guidance": 7.5}),
        ("--style Oil Painting", {"styles": ("oil-painting",)}),
        ("--styles anime, pixel_art", {"styles": ("anime", "pixel-art")}),
        ("--style anime --style anime,sketch", {"styles": ("anime", "sketch")}),
        ("--no blurry, text, watermark", {"negative": "blurry, text, watermark"}),
        ("--no blurry --no text", {"negative": "blurry, text"}),
        ("--n 3", {"count": 3}),
        ("--count 2", {"count": 2}),
        ("--raw", {"raw": True}),
        ("--raw on", {"raw": True}),
        ("--raw off", {"raw": False}),
        ("--sampler DPM++ 2M Karras", {"scheduler": "DPM++ 2M Karras"}),
        ("--scheduler euler   a --seed 1", {"scheduler": "Euler a", "seed": 1}),
        ("--model sdxl-turbo", {"model": "sdxl-turbo"}),
        ("--model stabilityai/sd-turbo", {"model": "stabilityai/sd-turbo"}),
        ("--model default", {"model": None}),
        ("--strength 0.4", {"strength": 0.4}),
        ("--strength .4", {"strength": 0.4}),
        ("--ar 1:1", {"width": 512, "height": 512}),
        ("--ar 2:3", {"width": 416, "height": 624}),
        ("--ar 16x9", {"width": 680, "height": 384}),
        ("--ar 16:9 --w 1024", {"width": 1024, "height": 576}),
        ("--ar 16:9 --h 576", {"width": 1024, "height": 576}),
        ("--seed=7 --AR=3:2", {"seed": 7, "width": 624, "height": 416}),
    ],
)
def test_each_flag(flags: str, expected: dict[str, Any]) -> None:
    assert parse_command(f"a cat {flags}") == GenerationRequest(prompt="a cat", **expected)


def test_em_and_en_dash_are_flags() -> None:
    assert parse_command("a cat — sleepy —seed 4 –steps 9") == GenerationRequest(
        prompt="a cat — sleepy", seed=4, steps=9
    )
    # Dashes inside words or standing alone are prompt text.
    assert parse_command("state-of-the-art cat -- x — y").prompt == "state-of-the-art cat -- x — y"


def test_invisible_characters_and_newlines_are_cleaned() -> None:
    req = parse_command("a\u200b cat\n--seed\u00a05")
    assert (req.prompt, req.seed) == ("a cat", 5)


def test_size_for_aspect_rule() -> None:
    assert size_for_aspect(16 / 9) == (680, 384)
    assert size_for_aspect(1.0, 768) == (768, 768)
    w, h = size_for_aspect(4.0)
    assert (w, h) == (1024, 256)


def test_aspect_keeps_the_area_of_the_default_size() -> None:
    req = parse_command("a cat --ar 16:9", {"width": 1024, "height": 1024})
    assert (req.width, req.height) == (1368, 768)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("a cat --sed 4", "unknown flag --sed (did you mean --seed?). Valid flags: --ar, "),
        ("a cat --ar16:9", "did you mean --ar 16:9?"),
        ("a cat --zzz 1", "unknown flag --zzz. Valid flags:"),
        ("a cat --seed", "--seed needs a value, e.g. --seed 42"),
        ("a cat --seed --steps 4", "--seed needs a value"),
        ("a cat --no", "--no needs a value"),
        ("a cat --seed abc", "--seed expects a whole number (or 'random'), got 'abc'"),
        ("a cat --seed 4 dogs", "got '4 dogs'"),
        (f"a cat --seed {MAX_SEED + 1}", f"--seed (seed): must be between 0 and {MAX_SEED}"),
        ("a cat --steps 2.5", "--steps expects a whole number, got '2.5'"),
        ("a cat --steps 0", "--steps (steps): must be between 1 and 150, got 0"),
        ("a cat --w 770", "--w (width): must be a multiple of 8, got 770"),
        ("a cat --height 32", "--height (height): must be at least 64, got 32"),
        ("a cat --cfg high", "--cfg expects a number, got 'high'"),
        ("a cat --cfg 31", "--cfg (guidance): must be between 0 and 30, got 31.0"),
        ("a cat --cfg nan", "--cfg expects a number, got 'nan'"),
        ("a cat --n 5", "--n (count): must be between 1 and 4, got 5"),
        ("a cat --raw dog", "--raw takes no value (or on/off), got 'dog'"),
        ("a cat --sampler Heun", "--sampler: unknown scheduler 'Heun'; choose one of:"),
        ("a cat --model two words", "--model expects one model name without spaces"),
        ("a cat --strength 0", "--strength (strength): must be above 0 and at most 1, got 0.0"),
        ("a cat --style watercolour", "--style: unknown style 'watercolour'; did you mean"),
        (
            "a cat --style anime,sketch,comic,manga,enhance",
            "--style (styles): at most 4 styles, got 5",
        ),
        ("a cat --ar 16", "--ar expects a ratio like 16:9, got '16'"),
        ("a cat --ar 0:1", "--ar expects a ratio like 16:9, got '0:1'"),
        ("a cat --ar 5:1", "--ar must be between 1:4 and 4:1, got '5:1'"),
        ("a cat --ar 1:1 --w 512 --h 512", "drop --w or --h"),
        ("a cat --seed 1 --seed 2", "--seed is given twice"),
        ("a cat --w 512 --width 768", "--width is given twice (--w too)"),
        ("--seed 4", "write the prompt before the flags"),
        ("   ", "write the prompt before the flags"),
    ],
)
def test_errors_name_the_flag_and_value(text: str, needle: str) -> None:
    with pytest.raises(InvalidRequest) as exc:
        parse_command(text)
    assert needle in exc.value.message
    assert "\n" not in exc.value.message


def test_defaults_apply_before_flags() -> None:
    defaults = {"width": 768, "height": 768, "steps": 30, "raw": True, "styles": ["anime"]}
    r = parse_command("a cat", defaults)
    assert (r.width, r.height, r.steps, r.raw, r.styles) == (768, 768, 30, True, ("anime",))
    r = parse_command("a cat --steps 10 --raw off --style none --w 512", defaults)
    assert (r.width, r.height, r.steps, r.raw, r.styles) == (512, 768, 10, False, ())
    assert parse_command("a cat", {"model": None}).model is None


def test_bad_defaults() -> None:
    with pytest.raises(InvalidRequest, match="unknown default setting 'seed'"):
        parse_command("a cat", {"seed": 3})
    with pytest.raises(InvalidRequest, match="your default width \\(width\\): must be a multiple"):
        parse_command("a cat", {"width": 500})


STYLE_TOML = """
[wide]
label = "Wide"
prompt = "{prompt}, panorama"
width = 768
height = 384
steps = 25
[plain]
label = "Plain"
prompt = "{prompt}"
"""


def test_style_params_sit_between_model_defaults_and_user_settings() -> None:
    reg = StyleRegistry.from_toml(STYLE_TOML)
    req = parse_command("a cat --style wide", registry=reg)
    assert (req.width, req.height, req.steps) == (768, 384, 25)
    req = parse_command("a cat --style wide --steps 9", {"width": 640}, registry=reg)
    assert (req.width, req.height, req.steps) == (640, 384, 9)
    # format_request knows the style's params, so nothing redundant is written.
    assert format_request(parse_command("a cat --style wide", registry=reg), registry=reg) == (
        "a cat --style wide"
    )
    back = parse_command("a cat --style plain --w 768 --h 384 --steps 25", registry=reg)
    assert format_request(back, registry=reg).endswith("--w 768 --h 384 --steps 25")


def test_format_request_is_short_and_parses_back() -> None:
    req = GenerationRequest(prompt="a cat")
    assert format_request(req) == "a cat"
    req = GenerationRequest(
        prompt="a cat", negative="dogs", styles=("anime",), width=768, guidance=6.5,
        scheduler="DPM++ 2M Karras", seed=9, count=2, model="sd15", strength=0.5, raw=True,
    )  # fmt: skip
    text = format_request(req)
    assert text == (
        "a cat --style anime --no dogs --w 768 --cfg 6.5 --sampler DPM++ 2M Karras --seed 9 "
        "--n 2 --model sd15 --strength 0.5 --raw"
    )
    assert parse_command(text) == req


def test_format_request_against_defaults_clears_them() -> None:
    defaults = {"styles": "anime", "negative": "text", "raw": True, "model": "sdxl"}
    req = GenerationRequest(prompt="a cat")
    text = format_request(req, defaults)
    assert text == "a cat --style none --no none --model default --raw off"
    assert parse_command(text, defaults) == req


def test_flags_help_lists_every_flag() -> None:
    text = flags_help()
    for flag in ("--ar 16:9", "--w/--width", "--no", "--raw", "--sampler/--scheduler"):
        assert flag in text


# Round trip -----------------------------------------------------------------------------

_WORDS = st.text(
    alphabet=st.sampled_from(list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 ,.!?'()[]:éñüкот猫")),
    min_size=1,
    max_size=60,
)
_PROMPTS = _WORDS.map(normalize).filter(bool)
_NEGATIVES = st.one_of(st.just(""), _PROMPTS.filter(lambda s: s.lower() != "none"))
_SIDES = st.integers(8, 256).map(lambda n: n * 8)
_GUIDANCE = st.integers(0, 3000).map(lambda n: n / 100)
_MODELS = st.one_of(
    st.none(),
    st.from_regex(r"[a-z0-9][a-z0-9._/-]{0,20}", fullmatch=True).filter(
        lambda m: m not in ("none", "default")
    ),
)


@st.composite
def requests(draw: st.DrawFn) -> GenerationRequest:
    names = default_registry().names()
    return GenerationRequest(
        prompt=draw(_PROMPTS),
        negative=draw(_NEGATIVES),
        styles=tuple(draw(st.lists(st.sampled_from(names), max_size=4, unique=True))),
        width=draw(_SIDES),
        height=draw(_SIDES),
        steps=draw(st.integers(1, 150)),
        guidance=draw(_GUIDANCE),
        scheduler=draw(st.sampled_from(SCHEDULERS)),
        seed=draw(st.one_of(st.none(), st.integers(0, MAX_SEED))),
        count=draw(st.integers(1, 4)),
        model=draw(_MODELS),
        raw=draw(st.booleans()),
    )


@settings(max_examples=300, deadline=None)
@given(requests())
def test_format_then_parse_round_trips(req: GenerationRequest) -> None:
    assert parse_command(format_request(req)) == req


_DEFAULTS = st.fixed_dictionaries(
    {},
    optional={
        "width": _SIDES,
        "steps": st.integers(1, 150),
        "raw": st.booleans(),
        "styles": st.lists(st.sampled_from(["anime", "sketch", "enhance"]), max_size=2),
        "negative": _NEGATIVES,
        "model": _MODELS,
        "scheduler": st.sampled_from(SCHEDULERS),
    },
)


@settings(max_examples=150, deadline=None)
@given(requests(), _DEFAULTS)
def test_round_trip_with_user_defaults(req: GenerationRequest, defaults: dict[str, Any]) -> None:
    assert parse_command(format_request(req, defaults), defaults) == req


def test_a_text_too_long_is_refused_before_it_is_read() -> None:
    # A megabyte of zero-width spaces around a short prompt: normalising would leave "a cat",
    # but the raw length is what costs, so it is refused first, naming limit and length.
    text = "\u200b" * 1_000_000 + "a cat"
    limit = command_limit(Limits())
    assert limit == 2 * Limits().max_prompt_chars + 500
    with pytest.raises(PromptTooLong, match=f"is {len(text)} characters; the limit is {limit}"):
        parse_command(text)
    small = Limits(max_prompt_chars=10)
    with pytest.raises(PromptTooLong, match=f"the limit is {command_limit(small)}"):
        parse_command("a cat " * 100, limits=small)
    assert parse_command("\u200b" * 100 + "a cat").prompt == "a cat"


def test_control_flags_need_a_picture_and_carry_each_setting() -> None:
    text = "a castle --control canny --control-weight 0.8 --control-start 0.1 --control-end 0.7"
    with pytest.raises(InvalidRequest, match="--control needs a picture: attach one"):
        parse_command(text)
    request, control = parse_flags(text)
    assert request.control is None and request.prompt == "a castle"
    assert control == ControlFlags(None, "canny", 0.8, 0.1, 0.7)
    unit = parse_command(text, control_image=b"png").control
    assert unit is not None and unit.image == b"png" and unit.preprocessor == "canny"
    # Not a preprocessor: a ControlNet's catalogue name, its own preprocessor left to it.
    assert parse_flags("a --control edges")[1] == ControlFlags("edges", None, 1.0, 0.0, 1.0)
    assert parse_flags("a --control scribble_xdog")[1] == ControlFlags(
        None, "scribble", 1.0, 0.0, 1.0
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ("--control canny --control-weight 3", "--control-weight: .* 2, got 3.0"),
        ("--control canny --control-start 1.5", "--control-start: .*, got 1.5"),
        ("--control canny --control-start 0.8 --control-end 0.2",
         "--control-end: control end must be after its start, got start 0.8 and end 0.2"),
        ("--control canny --control-weight lots", "--control-weight expects a number, got 'lots'"),
        ("--control-weight 0.5", "--control-weight sets the ControlNet of --control"),
        ("--control", "--control needs a value"),
        ("--control two words", "--control expects canny, scribble, none .* got 'two words'"),
        ("--control canny --control none", "--control is given twice"),
    ],
)
def test_each_bad_control_value_is_one_line_naming_it(flags: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message) as caught:
        parse_flags(f"a castle {flags}")
    assert "\n" not in caught.value.message
