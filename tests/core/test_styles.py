"""The styles registry: shipped data, lookup with suggestions, templates and negatives."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import ConfigError, InvalidRequest
from core.styles import Style, StyleRegistry, default_registry, merge_terms

EXPECTED = {
    "photographic", "cinematic", "anime", "watercolor", "oil-painting", "pixel-art", "line-art",
    "isometric", "low-poly", "origami", "comic", "fantasy-art", "neon-punk", "analog-film",
    "3d-model", "digital-art", "enhance", "cyberpunk", "vaporwave", "ukiyo-e", "claymation",
    "sketch",
}  # fmt: skip


def test_shipped_registry_has_the_curated_styles() -> None:
    reg = default_registry()
    assert len(reg) >= 20
    assert set(reg.names()) >= EXPECTED
    for style in reg.all():
        assert style.prompt.count("{prompt}") == 1
        assert style.label
        assert ",," not in style.negative.replace(" ", "")


def test_default_registry_is_cached() -> None:
    assert default_registry() is default_registry()


def test_get_is_forgiving_about_spelling_of_separators() -> None:
    reg = default_registry()
    assert reg.get("Oil Painting").name == "oil-painting"
    assert reg.get(" PIXEL_ART ").name == "pixel-art"
    assert "Watercolor" in reg


def test_unknown_style_suggests_the_closest() -> None:
    with pytest.raises(InvalidRequest) as exc:
        default_registry().get("watercolour")
    assert exc.value.message == "unknown style 'watercolour'; did you mean 'watercolor'?"


def test_unknown_style_without_a_close_match_lists_the_styles() -> None:
    with pytest.raises(InvalidRequest) as exc:
        default_registry().get("zzzzzz")
    assert "available styles:" in exc.value.message and "anime" in exc.value.message


def test_apply_fills_the_template_and_merges_negatives() -> None:
    style = Style(name="t", label="T", prompt="art of {prompt}, vivid", negative="blurry, , ugly")
    prompt, negative = style.apply("a {curly} cat", "Blurry, text,")
    assert prompt == "art of a {curly} cat, vivid"
    assert negative == "blurry, ugly, text"


def test_apply_without_negatives() -> None:
    style = Style(name="t", label="T", prompt="{prompt}")
    assert style.apply("x") == ("x", "")


def test_merge_terms_dedups_loosely_and_drops_empties() -> None:
    assert merge_terms("low-res, a", "", " ,Lowres, b ,") == "low-res, a, b"
    assert merge_terms("", " , ") == ""


def test_style_params_only_those_defined(tmp_path: Path) -> None:
    path = tmp_path / "styles.toml"
    path.write_text(
        '[wide]\nlabel = "Wide"\nprompt = "{prompt}, panorama"\nwidth = 768\nheight = 384\n'
        "guidance = 5.5\n"
    )
    reg = StyleRegistry.load(path)
    assert reg.get("wide").params() == {"width": 768, "height": 384, "guidance": 5.5}


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ('[a]\nlabel = "A"\nprompt = "no slot"\n', "exactly once"),
        ('[a]\nlabel = "A"\nprompt = "{prompt}"\ncolour = "red"\n', "colour"),
        ('[Bad_Name]\nlabel = "A"\nprompt = "{prompt}"\n', "Bad_Name"),
        ('[none]\nlabel = "A"\nprompt = "{prompt}"\n', "none"),
        ('[a]\nlabel = "A"\nprompt = "{prompt}"\nwidth = 500\n', "500"),
        ("[a\n", "invalid TOML"),
        ('a = "x"\n', "must be a table"),
    ],
)
def test_bad_styles_file_names_the_problem(tmp_path: Path, body: str, needle: str) -> None:
    path = tmp_path / "styles.toml"
    path.write_text(body)
    with pytest.raises(ConfigError) as exc:
        StyleRegistry.load(path)
    assert needle in exc.value.message
    assert str(path) in exc.value.message


def test_missing_styles_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read styles file"):
        StyleRegistry.load(tmp_path / "nope.toml")


def test_duplicate_style_names_rejected() -> None:
    s = Style(name="a", label="A", prompt="{prompt}")
    with pytest.raises(ConfigError, match="twice"):
        StyleRegistry([s, s])
