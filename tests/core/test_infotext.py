"""A1111 infotext: exact format, parsing of A1111 and SD.Next samples, round trips, PNG chunks."""

from __future__ import annotations

import contextlib
import json
import re
import struct
import zlib
from dataclasses import replace
from io import BytesIO

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from core.errors import InvalidRequest
from core.infotext import (
    MAX_INFOTEXT_BYTES,
    Infotext,
    clean_prompt_text,
    format_infotext,
    infotext_for,
    parse_infotext,
    png_with_infotext,
    read_png_infotext,
)
from core.request import SCHEDULERS, GenerationRequest, JobKind, ModelDefaults

SDNEXT_SAMPLE = (
    "masterpiece, a lighthouse at dusk, oil painting\n"
    "Negative prompt: blurry, lowres\n"
    "Steps: 20, Seed: 2613539452, Sampler: DPM++ 2M Karras, CFG scale: 6, Size: 768x512, "
    "Parser: Full parser, Model: dreamshaper_8, Model hash: 879db523c3, Backend: Diffusers, "
    'App: SD.Next, Version: 6b3a2c8, Operations: txt2img, Styles: "cinematic, moody"'
)

A1111_SAMPLE = (
    "a photo of a cat wearing a hat, (detailed:1.2)\n"
    "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, "
    'Lora hashes: "add_detail: 7c6bad76eb54, film: 1f2a", Version: v1.10.1'
)

KNOWN_KEYS = {
    "Steps",
    "Sampler",
    "CFG scale",
    "Seed",
    "Size",
    "Model",
    "Denoising strength",
    "Styles",
}

# The parser A1111 itself runs (modules/infotext_utils.py, parse_generation_parameters), minus
# its UI defaults: our output must read the same through it.
_A1111_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def a1111_parse(x: str) -> dict[str, str]:
    res: dict[str, str] = {}
    prompt = ""
    negative_prompt = ""
    done_with_prompt = False
    *lines, lastline = x.strip().split("\n")
    if len(_A1111_RE_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"] = prompt
    res["Negative prompt"] = negative_prompt
    for k, v in _A1111_RE_PARAM.findall(lastline):
        if v[0] == '"' and v[-1] == '"':
            with contextlib.suppress(ValueError):
                v = json.loads(v)
        res[k] = v
    return res


def test_format_matches_a1111_layout() -> None:
    info = Infotext(
        prompt="a lighthouse at dusk",
        negative="blurry, lowres",
        steps=20,
        sampler="Euler a",
        cfg_scale=7.0,
        seed=1,
        width=512,
        height=512,
        model="name",
        styles=("a", "b"),
        denoising_strength=0.75,
    )
    assert format_infotext(info) == (
        "a lighthouse at dusk\n"
        "Negative prompt: blurry, lowres\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model: name, "
        'Denoising strength: 0.75, Styles: "a, b"'
    )


def test_format_omits_empty_negative_and_unset_fields() -> None:
    info = Infotext("cat", "", 30, "DDIM", 6.5, 42, 768, 512)
    assert format_infotext(info) == (
        "cat\nSteps: 30, Sampler: DDIM, CFG scale: 6.5, Seed: 42, Size: 768x512"
    )


def test_format_quotes_values_like_a1111() -> None:
    info = Infotext(
        "p", "", 20, "Euler", 7, 1, 512, 512, extra={"Lora hashes": "a: 1, b: 2", "Note": 'x"y'}
    )
    line = format_infotext(info).split("\n")[-1]
    assert line.endswith('Lora hashes: "a: 1, b: 2", Note: "x\\"y"')


def test_parses_sdnext_sample() -> None:
    info = parse_infotext(SDNEXT_SAMPLE)
    assert info.prompt == "masterpiece, a lighthouse at dusk, oil painting"
    assert info.negative == "blurry, lowres"
    assert (info.steps, info.seed, info.sampler) == (20, 2613539452, "DPM++ 2M Karras")
    assert info.cfg_scale == 6.0
    assert (info.width, info.height) == (768, 512)
    assert info.model == "dreamshaper_8"
    assert info.styles == ("cinematic", "moody")
    assert info.denoising_strength is None
    assert info.extra == {
        "Parser": "Full parser",
        "Model hash": "879db523c3",
        "Backend": "Diffusers",
        "App": "SD.Next",
        "Version": "6b3a2c8",
        "Operations": "txt2img",
    }


def test_parses_a1111_sample() -> None:
    info = parse_infotext(A1111_SAMPLE)
    assert info.prompt == "a photo of a cat wearing a hat, (detailed:1.2)"
    assert info.negative == ""
    assert (info.steps, info.sampler, info.cfg_scale, info.seed) == (20, "Euler a", 7.0, 1)
    assert (info.width, info.height, info.model) == (512, 512, "v1-5-pruned-emaonly")
    assert info.styles == ()
    assert info.extra == {
        "Model hash": "6ce0161689",
        "Lora hashes": "add_detail: 7c6bad76eb54, film: 1f2a",
        "Version": "v1.10.1",
    }


def test_parses_multiline_prompt_and_negative() -> None:
    text = (
        "line one, a\n\nline three\n"
        "Negative prompt: bad hands,\nugly\n"
        "Steps: 25, Sampler: Euler a, CFG scale: 7.5, Seed: 9, Size: 512x768, "
        "Denoising strength: 0.6, Clip skip: 2"
    )
    info = parse_infotext(text)
    assert info.prompt == "line one, a\n\nline three"
    assert info.negative == "bad hands,\nugly"
    assert info.denoising_strength == 0.6
    assert info.extra == {"Clip skip": "2"}


def test_missing_fields_are_named() -> None:
    text = "cat\nSteps: 20, Sampler: Euler a, Seed: 1, Model: x"
    with pytest.raises(InvalidRequest, match="CFG scale, Size"):
        parse_infotext(text)


@pytest.mark.parametrize("text", ["", "just a prompt", "cat\nSteps: 20, Seed: 1"])
def test_text_without_params_line_is_rejected(text: str) -> None:
    with pytest.raises(InvalidRequest, match="no parameters line"):
        parse_infotext(text)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("Steps: twenty, Sampler: a, CFG scale: 7, Seed: 1, Size: 512x512", "Steps"),
        ("Steps: 20, Sampler: a, CFG scale: high, Seed: 1, Size: 512x512", "CFG scale"),
        ("Steps: 20, Sampler: a, CFG scale: 7, Seed: 1, Size: 512 by 512", "Size"),
    ],
)
def test_bad_values_are_named(line: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        parse_infotext(f"cat\n{line}")


def test_extra_may_not_shadow_known_keys_or_break_the_line() -> None:
    base = Infotext("p", "", 20, "Euler", 7, 1, 512, 512)
    with pytest.raises(InvalidRequest, match="Steps"):
        format_infotext(replace(base, extra={"Steps": "3"}))
    with pytest.raises(InvalidRequest, match="not a valid"):
        format_infotext(replace(base, extra={"a:b": "3"}))


def _request(**kw: object) -> GenerationRequest:
    """A request resolved against an SD1.5-like model's defaults (as every request past
    submit is: an infotext records what ran)."""
    fields: dict[str, object] = {"prompt": "a cat", "styles": ("watercolor", "noir")}
    fields.update(kw)
    return GenerationRequest(**fields).with_model_defaults(
        ModelDefaults(width=512, height=512, steps=20, guidance=7.0, scheduler="Euler a"))


def test_infotext_for_formats_numbers_like_a1111() -> None:
    info = infotext_for(
        _request(guidance=7.0), prompt="a cat, watercolor", negative="", seed=5, model="sd15"
    )
    assert format_infotext(info) == (
        "a cat, watercolor\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 512x512, Model: sd15, "
        'Styles: "watercolor, noir"'
    )
    half = infotext_for(_request(guidance=6.5), prompt="x", negative="", seed=5, model="sd15")
    assert "CFG scale: 6.5," in format_infotext(half)


def test_infotext_for_img2img_records_strength_and_nothing_personal() -> None:
    request = _request(kind=JobKind.img2img, init_image=b"png", strength=0.5)
    info = infotext_for(request, prompt=" a cat \n", negative="dog", seed=7, model="sd15")
    assert info.denoising_strength == 0.5
    assert info.prompt == "a cat"
    assert info.extra == {}
    keys = {k for k, _ in _A1111_RE_PARAM.findall(format_infotext(info).split("\n")[-1])}
    assert keys == KNOWN_KEYS


def test_infotext_for_records_a_vary_region_edit() -> None:
    from core.request import Edit

    request = _request(kind=JobKind.inpaint, init_image=b"png", mask=b"m", strength=1.0,
                       edit=Edit.vary_region)
    text = format_infotext(infotext_for(request, prompt="a star", negative="", seed=3, model="m"))
    assert text.endswith("Edit: Vary (Region)")
    back = parse_infotext(text)
    assert back.extra == {"Edit": "Vary (Region)"} and back.denoising_strength == 1.0


# Round trips -----------------------------------------------------------------------------------

_NASTY = st.sampled_from([",", ":", '"', "\\", "\n", "\r\n", " ", "é", "雪", "🎨", "(a:1.2)", "\t"])
_TEXT = st.lists(st.one_of(st.text(max_size=12), _NASTY), max_size=8).map("".join)


def _prompt_text(text: str) -> str:
    # A1111 strips lines, and a line opening with "Negative prompt:" always starts the negative.
    clean = clean_prompt_text(text)
    return "\n".join(
        ("x " + line) if line.startswith("Negative prompt:") else line for line in clean.split("\n")
    )


_PROMPTS = _TEXT.map(_prompt_text)
_VALUES = st.one_of(st.sampled_from(SCHEDULERS), _TEXT)
_STYLES = st.lists(_TEXT.map(lambda s: s.replace(",", " ").strip()).filter(bool), max_size=4).map(
    tuple
)
_EXTRA_KEYS = st.one_of(
    st.sampled_from(["Model hash", "Version", "Clip skip", "ENSD", "Schedule type", "Lora hashes"]),
    st.from_regex(r"[A-Za-z][A-Za-z0-9 \-/]{0,12}[A-Za-z0-9]", fullmatch=True),
).filter(lambda k: k not in KNOWN_KEYS)

_INFOTEXTS = st.builds(
    Infotext,
    prompt=_PROMPTS,
    negative=st.one_of(st.just(""), _PROMPTS),
    steps=st.integers(1, 150),
    sampler=_VALUES,
    cfg_scale=st.one_of(
        st.floats(0, 30, allow_nan=False), st.integers(0, 30).map(float), st.just(6.5)
    ),
    seed=st.integers(0, 2**32 - 1),
    width=st.integers(8, 4096),
    height=st.integers(8, 4096),
    model=st.one_of(st.none(), _VALUES.filter(bool)),
    styles=_STYLES,
    denoising_strength=st.one_of(st.none(), st.floats(0, 1, allow_nan=False)),
    extra=st.dictionaries(_EXTRA_KEYS, _VALUES, max_size=4),
)


@given(_INFOTEXTS)
def test_round_trip(info: Infotext) -> None:
    assert parse_infotext(format_infotext(info)) == info


@given(_INFOTEXTS)
def test_a1111_reads_our_output(info: Infotext) -> None:
    parsed = a1111_parse(format_infotext(info))
    assert parsed["Prompt"] == info.prompt
    assert parsed["Negative prompt"] == info.negative
    assert parsed["Sampler"] == info.sampler
    assert float(parsed["CFG scale"]) == info.cfg_scale
    assert parsed["Size"] == f"{info.width}x{info.height}"
    for key, value in info.extra.items():
        assert parsed[key] == value


@given(prompt=_TEXT, negative=_TEXT, seed=st.integers(0, 2**32 - 1))
def test_infotext_for_round_trips(prompt: str, negative: str, seed: int) -> None:
    info = infotext_for(_request(), prompt=prompt, negative=negative, seed=seed, model="m")
    lines = [*info.prompt.split("\n"), *info.negative.split("\n")[1:]]
    if any(line.startswith("Negative prompt:") for line in lines):
        return  # A1111's format itself cannot tell such a line from the negative's start
    assert parse_infotext(format_infotext(info)) == info


# PNG chunks ------------------------------------------------------------------------------------


def _png() -> bytes:
    buf = BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format="PNG")
    return buf.getvalue()


def _chunk_types(png: bytes) -> list[bytes]:
    types, pos = [], 8
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        ctype = png[pos + 4 : pos + 8]
        data = png[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", png[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(ctype + data)
        types.append(ctype)
        pos += 12 + length
    return types


def test_png_latin1_text_goes_in_text_chunk_pillow_and_we_read() -> None:
    text = format_infotext(Infotext("café, dusk", "", 20, "Euler a", 7, 1, 8, 8))
    png = png_with_infotext(_png(), text)
    assert _chunk_types(png)[:3] == [b"IHDR", b"tEXt", b"IDAT"]
    assert read_png_infotext(png) == text
    with Image.open(BytesIO(png)) as img:
        assert img.info["parameters"] == text
        assert img.getpixel((0, 0)) == (255, 0, 0)


def test_png_unicode_text_goes_in_itxt_and_replaces_the_old_one() -> None:
    first = png_with_infotext(_png(), "old\nSteps: 1, Sampler: a, CFG scale: 1")
    text = "雪の灯台 🎨\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 8x8"
    png = png_with_infotext(first, text)
    types = _chunk_types(png)
    assert b"iTXt" in types and b"tEXt" not in types
    assert read_png_infotext(png) == text
    with Image.open(BytesIO(png)) as img:
        assert img.info["parameters"] == text


def test_png_from_pil_image() -> None:
    png = png_with_infotext(Image.new("RGB", (4, 4)), "a\nSteps: 1, Sampler: a, CFG scale: 1")
    assert read_png_infotext(png) == "a\nSteps: 1, Sampler: a, CFG scale: 1"


def test_read_png_infotext_of_pillow_written_chunks() -> None:
    from PIL.PngImagePlugin import PngInfo

    for zip_ in (False, True):
        meta = PngInfo()
        meta.add_itxt("parameters", "雪 " * 100, zip=zip_)
        buf = BytesIO()
        Image.new("RGB", (4, 4)).save(buf, format="PNG", pnginfo=meta)
        assert read_png_infotext(buf.getvalue()) == "雪 " * 100


def test_read_png_infotext_none_cases() -> None:
    assert read_png_infotext(_png()) is None
    assert read_png_infotext(b"GIF89a....") is None
    assert read_png_infotext(b"") is None
    assert read_png_infotext(_png()[:20]) is None


def test_read_png_infotext_caps_compressed_text() -> None:
    bomb = zlib.compress(b"a" * (MAX_INFOTEXT_BYTES + 1), 9)
    chunk_data = b"parameters\0\0" + bomb
    chunk = struct.pack(">I4s", len(chunk_data), b"zTXt") + chunk_data
    chunk += struct.pack(">I", zlib.crc32(b"zTXt" + chunk_data))
    png = _png()
    assert read_png_infotext(png[:33] + chunk + png[33:]) is None
