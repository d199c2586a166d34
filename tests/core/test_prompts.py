"""Prompt processing: normalising, enhancement, blocklist matching, the CLIP token limit."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import ConfigError, ContentBlocked, PromptTooLong
from core.prompts import (
    DEFAULT_NEGATIVE,
    QUALITY_TERMS,
    Blocklist,
    check_token_limit,
    default_blocklist,
    enhance,
    estimate_clip_tokens,
    normalize,
    prepare_prompt,
)
from core.request import GenerationRequest
from core.styles import StyleRegistry, default_registry

# normalize ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  a   cat\n\tin  a hat ", "a cat in a hat"),
        ("n\u200bu\u200cd\u200de\ufeff", "nude"),
        ("soft\u00adhyphen", "softhyphen"),
        ("\u202ereversed\u202c \u2066iso\u2069", "reversed iso"),
        ("\u2060word\u2061joiner\u2064", "wordjoiner"),
        ("ｆｕｌｌ　ｗｉｄｔｈ", "full width"),
        ("ﬁne ①", "fine 1"),
        ("bell\x07 null\x00", "bell null"),
    ],
)
def test_normalize(text: str, expected: str) -> None:
    assert normalize(text) == expected


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_normalize_is_idempotent(text: str) -> None:
    once = normalize(text)
    assert normalize(once) == once
    assert once == once.strip()
    assert "  " not in once


# enhance --------------------------------------------------------------------------------


def test_enhance_appends_quality_and_default_negative() -> None:
    prompt, negative = enhance("a cat,", "Blurry, text")
    assert prompt == "a cat, " + ", ".join(QUALITY_TERMS)
    terms = negative.split(", ")
    assert terms[:2] == ["Blurry", "text"]
    assert "blurry" not in terms  # deduplicated, case-insensitively
    assert set(DEFAULT_NEGATIVE) - {"blurry"} <= set(terms)


def test_enhance_never_puts_a_term_on_both_sides() -> None:
    prompt, negative = enhance("pixel art, low-res", "highly detailed")
    assert "highly detailed" not in prompt
    assert "lowres" not in negative


def test_enhance_raw_is_unchanged() -> None:
    assert enhance(" a cat ", "x", raw=True) == (" a cat ", "x")


# blocklist ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blocklist() -> Blocklist:
    return default_blocklist()


@pytest.mark.parametrize(
    "text",
    [
        "nsfw",
        "a NSFW cat",
        "n.s.f.w",
        "n s f w art",
        "N-S-F-W",
        "n_s_f_w",
        "nuuuude",
        "NÜDE",
        "nud3",
        "nаkеd",  # Cyrillic а and е
        "ѕoft porn",  # Cyrillic dze in another word, then "porn"
        "p0rn",
        "p.o.r.n",
        "cat,porn",
        "nudes",
        "h3nt@i",
        "gοre",  # Greek omicron
        "n\u200bude",
    ],
)
def test_nsfw_terms_match_disguised(blocklist: Blocklist, text: str) -> None:
    match = blocklist.first_match(text)
    assert match is not None and match[0] == "nsfw", text


@pytest.mark.parametrize(
    "text",
    [
        "a classic glass in class",
        "Scunthorpe cityscape",
        "a cat in the sunset",
        "cpu cooler, cpr dummy",
        "vitamin c pills",
        "a pedometer on a desk",
        "lollipop",
        "explicitly colourful",
        "n00dle soup",
        "topiary garden",
        "a nudibranch",
        "the gorge at dawn",
        "a lighthouse number 10011",  # digits only: a number, not "loli" in leetspeak
        "room 1011, floor 10",
        "the year 1337",
    ],
)
def test_innocent_words_pass(blocklist: Blocklist, text: str) -> None:
    assert blocklist.first_match(text) is None


def test_word_boundaries_scunthorpe() -> None:
    bl = Blocklist(nsfw=["ass"])
    for ok in ("class", "classic", "assassin", "bass guitar", "glasses", "as", "a s"):
        assert bl.first_match(ok) is None, ok
    for bad in ("ass", "a.s.s", "a s s", "@ss", "aSS!", "4ss", "asses", "big,ass,"):
        assert bl.first_match(bad) == ("nsfw", "ass"), bad


def test_never_terms(blocklist: Blocklist) -> None:
    terms = ("l0li", "1oli", "10li", "shotacon art", "child p0rn", "child-porn", "c.p.", "c p")
    terms += ("CP",)
    for text in terms:
        match = blocklist.first_match(text)
        assert match is not None and match[0] == "never", text


def test_check_never_is_blocked_everywhere_without_echo(blocklist: Blocklist) -> None:
    for allowed in (False, True):
        with pytest.raises(ContentBlocked) as exc:
            blocklist.check("a l.o.l.i girl", nsfw_allowed=allowed)
        assert exc.value.message == "your prompt contains a term that is not allowed here"
        assert "loli" not in exc.value.message


def test_check_nsfw_depends_on_channel(blocklist: Blocklist) -> None:
    blocklist.check("a nude statue", nsfw_allowed=True)
    with pytest.raises(ContentBlocked) as exc:
        blocklist.check("a nude statue", nsfw_allowed=False)
    assert "not allowed here" in exc.value.message
    assert "NSFW" in exc.value.message
    blocklist.check("a marble statue", nsfw_allowed=False)


def test_blocklist_file_format(tmp_path: Path) -> None:
    path = tmp_path / "bl.txt"
    path.write_text("# comment\n[never]\nfoo bar  # trailing comment\n\n[NSFW]\nbaz\n")
    bl = Blocklist.load(path)
    assert bl.first_match("foo-bar") == ("never", "foo bar")
    assert bl.first_match("foobar") == ("never", "foo bar")
    assert bl.first_match("b a z") == ("nsfw", "baz")
    assert bl.first_match("foo") is None


@pytest.mark.parametrize(
    ("body", "needle"),
    [("term\n", "before any"), ("[maybe]\nx\n", "unknown section [maybe]"), ("[nsfw]\n!!\n", "")],
)
def test_bad_blocklist_file(tmp_path: Path, body: str, needle: str) -> None:
    path = tmp_path / "bl.txt"
    path.write_text(body)
    with pytest.raises(ConfigError) as exc:
        Blocklist.load(path)
    assert needle in exc.value.message


def test_missing_blocklist_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read blocklist file"):
        Blocklist.load(tmp_path / "nope.txt")


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="aeiouns l1!|@$.-_ ", max_size=400))
def test_blocklist_match_agrees_with_check_on_adversarial_text(text: str) -> None:
    # Look-alike letters and separators, the text that makes a pattern work hardest: what
    # first_match reports is exactly what check enforces, in either kind of channel.
    blocklist = default_blocklist()
    found = blocklist.first_match(text)
    if found is None:
        blocklist.check(text, nsfw_allowed=False)
        return
    section, term = found
    assert term in {t.text for t in (blocklist.never if section == "never" else blocklist.nsfw)}
    with pytest.raises(ContentBlocked):
        blocklist.check(text, nsfw_allowed=False)
    if section == "never":
        with pytest.raises(ContentBlocked):
            blocklist.check(text, nsfw_allowed=True)
    else:
        blocklist.check(text, nsfw_allowed=True)


# tokens ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("", 0),
        ("a cat", 2),
        ("a cat, highly detailed", 5),
        ("it's", 2),
        ("1024", 4),
        ("photorealistic", 2),
        ("(masterpiece:1.2)", 8),  # ( master.. :1.2 ): 11 letters cost 2
        ("猫", 2),
        ("кот", 3),
    ],
)
def test_estimate_clip_tokens(text: str, tokens: int) -> None:
    assert estimate_clip_tokens(text) == tokens


def test_token_limit_ok_returns_count() -> None:
    assert check_token_limit("a cat") == 2
    assert check_token_limit("a cat", count_tokens=lambda s: 70) == 70


def test_token_limit_tells_where_the_model_stops() -> None:
    text = " ".join(f"w{i}" for i in range(60))  # 2 tokens a word: w + digit(s)... at least
    with pytest.raises(PromptTooLong) as exc:
        check_token_limit(text)
    msg = exc.value.message
    assert msg.startswith("your prompt is about ")
    assert "the model reads 75, so the part after '…" in msg
    assert msg.endswith("would be ignored. Shorten it or split it.")
    kept = msg.split("'…", 1)[1].split("'", 1)[0]
    assert estimate_clip_tokens(text[: text.index(kept) + len(kept)]) <= 75


def test_token_limit_exact_counter() -> None:
    words = [f"word{i}" for i in range(100)]

    def count(s: str) -> int:
        return len(s.split())

    with pytest.raises(PromptTooLong) as exc:
        check_token_limit(" ".join(words), count_tokens=count, what="your negative prompt")
    msg = exc.value.message
    assert msg.startswith("your negative prompt is 100 tokens;")
    assert "'…word71 word72 word73 word74'" in msg


# prepare_prompt -------------------------------------------------------------------------


def prep(nsfw: bool = False, **kw: object) -> list[tuple[str, str]]:
    req = GenerationRequest(**{"prompt": "a cat", **kw})
    return prepare_prompt(req, default_registry(), default_blocklist(), nsfw)


def test_prepare_plain_prompt() -> None:
    [(prompt, negative)] = prep()
    assert prompt == "a cat, highly detailed, sharp focus, high quality"
    assert negative.startswith("nsfw, nude, lowres, blurry")


def test_prepare_raw_keeps_the_prompt_but_still_applies_safety() -> None:
    assert prep(raw=True) == [("a cat", "nsfw, nude")]
    assert prep(nsfw=True, raw=True, negative="dogs") == [("a cat", "dogs")]


def test_prepare_one_pair_per_style() -> None:
    pairs = prep(nsfw=True, styles=("anime", "watercolor"), negative="text, dogs")
    assert len(pairs) == 2
    assert pairs[0][0].startswith("anime artwork of a cat, anime style")
    assert pairs[1][0].startswith("watercolor painting of a cat")
    for _, negative in pairs:
        assert negative.startswith("text, dogs, ")
        terms = [t.casefold() for t in negative.split(", ")]
        assert len(terms) == len(set(terms))


def test_prepare_normalizes_and_blocks_user_text_only() -> None:
    [(prompt, _)] = prep(prompt="a\u200b  cat", negative="nude, nsfw", raw=True)
    assert prompt == "a cat"
    with pytest.raises(ContentBlocked):
        prep(prompt="a n\u200bude cat")


def test_prepare_drops_our_additions_before_failing() -> None:
    # 70 tokens of user text: too little room for all the quality terms, but no error.
    prompt_text = " ".join(["cat"] * 70)
    [(prompt, negative)] = prep(prompt=prompt_text, negative=" ,".join(["dog"] * 60))
    assert estimate_clip_tokens(prompt) <= 75 and prompt.startswith(prompt_text)
    assert estimate_clip_tokens(negative) <= 75


def test_prepare_raises_when_the_user_text_does_not_fit() -> None:
    with pytest.raises(PromptTooLong, match="your prompt with the 'cinematic' style is about"):
        prep(prompt=" ".join(["cat"] * 60), styles=("cinematic",))
    with pytest.raises(PromptTooLong, match="your negative prompt is about"):
        prep(negative=", ".join(f"dog{i}" for i in range(40)))


def test_prepare_uses_the_exact_counter() -> None:
    req = GenerationRequest(prompt="a cat")
    pairs = prepare_prompt(
        req, default_registry(), default_blocklist(), True, count_tokens=lambda s: 1
    )
    assert pairs[0][0].endswith("high quality")
    with pytest.raises(PromptTooLong, match="is 99 tokens"):
        prepare_prompt(req, default_registry(), default_blocklist(), True, lambda s: 99)


def test_prepare_unknown_style_in_a_custom_registry() -> None:
    reg = StyleRegistry([])
    req = GenerationRequest(prompt="a cat", styles=("anime",))
    with pytest.raises(Exception, match="unknown style 'anime'"):
        prepare_prompt(req, reg, default_blocklist(), True)
