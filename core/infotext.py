"""A1111 "parameters" infotext: written and parsed as AUTOMATIC1111 and SD.Next do, and stored in
a PNG text chunk so that any of those tools can read an Atelier image's settings back.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from dataclasses import dataclass, field
from io import BytesIO
from typing import Final

from PIL import Image

from core.adapters import adapters_tags
from core.errors import InvalidRequest
from core.request import GenerationRequest, JobKind

# A1111's own patterns (modules/infotext_utils.py), so that we read what it reads.
_RE_PARAM: Final = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_RE_SIZE: Final = re.compile(r"^(\d+)x(\d+)$")
_RE_KEY: Final = re.compile(r"\w[\w \-/]+")
_NEGATIVE_PREFIX: Final = "Negative prompt:"

PNG_KEY: Final = "parameters"
# Like Pillow's MAX_TEXT_CHUNK: a compressed text chunk may not inflate past this.
MAX_INFOTEXT_BYTES: Final = 1024 * 1024

_KNOWN_KEYS: Final = frozenset(
    {"Steps", "Sampler", "CFG scale", "Seed", "Size", "Model", "Denoising strength", "Styles"}
)
_REQUIRED_KEYS: Final = ("Steps", "Sampler", "CFG scale", "Seed", "Size")
_DENOISING_KINDS: Final = frozenset({JobKind.img2img, JobKind.inpaint, JobKind.variation})
EDIT_KEY: Final = "Edit"  # names the edit that made an image from another (Vary (Region))


@dataclass(frozen=True)
class Infotext:
    """The generation settings of one image. ``extra`` keeps keys Atelier does not interpret."""

    prompt: str
    negative: str
    steps: int
    sampler: str
    cfg_scale: float
    seed: int
    width: int
    height: int
    model: str | None = None
    styles: tuple[str, ...] = ()
    denoising_strength: float | None = None
    extra: dict[str, str] = field(default_factory=dict)


def clean_prompt_text(text: str) -> str:
    """Trim each line and the whole text as A1111's parser does; such text survives a round trip."""
    return "\n".join(line.strip() for line in text.strip().split("\n"))


def format_number(value: float) -> str:
    """``7`` for 7.0 (as A1111 shows CFG scale), ``6.5`` for 6.5."""
    number = float(value)  # ints are welcome too (int.is_integer is 3.12+)
    if number.is_integer() and abs(number) < 1e15:
        return str(int(number))
    return repr(number)


def quote(value: str) -> str:
    """A1111's ``quote()``, widened to every value its regex could not read back unquoted."""
    needs_quotes = (
        value == "" or value != value.strip() or any(c in ',:"' or ord(c) < 0x20 for c in value)
    )
    return json.dumps(value, ensure_ascii=False) if needs_quotes else value


def _unquote(value: str) -> str:
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return value
    try:
        loaded = json.loads(value)
    except ValueError:
        return value
    return loaded if isinstance(loaded, str) else value


def format_infotext(info: Infotext) -> str:
    """The infotext A1111 would write: prompt, optional negative line, then the params line."""
    params: list[tuple[str, str]] = [
        ("Steps", str(info.steps)),
        ("Sampler", info.sampler),
        ("CFG scale", format_number(info.cfg_scale)),
        ("Seed", str(info.seed)),
        ("Size", f"{info.width}x{info.height}"),
    ]
    if info.model:
        params.append(("Model", info.model))
    if info.denoising_strength is not None:
        params.append(("Denoising strength", format_number(info.denoising_strength)))
    if info.styles:
        params.append(("Styles", ", ".join(info.styles)))
    for key, value in info.extra.items():
        if key in _KNOWN_KEYS:
            raise InvalidRequest(f"infotext extra key {key!r} duplicates a field of Infotext")
        if not _RE_KEY.fullmatch(key) or key != key.strip():
            raise InvalidRequest(f"infotext key {key!r} is not a valid A1111 parameter name")
        params.append((key, value))
    params_line = ", ".join(f"{key}: {quote(value)}" for key, value in params)
    negative = f"\n{_NEGATIVE_PREFIX} {info.negative}" if info.negative else ""
    return f"{info.prompt}{negative}\n{params_line}".strip()


def parse_infotext(text: str) -> Infotext:
    """Read an A1111 / SD.Next infotext. Raise InvalidRequest naming what is missing or bad."""
    *lines, last_line = text.strip().split("\n")
    if len(_RE_PARAM.findall(last_line)) < 3:
        raise InvalidRequest(
            "the infotext has no parameters line (like 'Steps: 20, Sampler: Euler a, ...')"
        )

    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for raw in lines:
        line = raw.strip()
        if line.startswith(_NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(_NEGATIVE_PREFIX) :].strip()
        target = negative_lines if in_negative else prompt_lines
        # A1111 drops empty lines until the first text of each part.
        if target or line:
            target.append(line)

    params: dict[str, str] = {}
    for key, value in _RE_PARAM.findall(last_line):
        params[key] = _unquote(value)

    missing = [key for key in _REQUIRED_KEYS if key not in params]
    if missing:
        raise InvalidRequest(f"the infotext has no {', '.join(missing)}")

    size = _RE_SIZE.match(params["Size"])
    if size is None:
        raise InvalidRequest(f"infotext Size must look like 512x768, got {params['Size']!r}")
    denoising = params.get("Denoising strength")
    strength = None if denoising is None else _parse_float("Denoising strength", denoising)
    styles = tuple(s.strip() for s in params.get("Styles", "").split(",") if s.strip())
    return Infotext(
        prompt="\n".join(prompt_lines),
        negative="\n".join(negative_lines),
        steps=_parse_int("Steps", params["Steps"]),
        sampler=params["Sampler"],
        cfg_scale=_parse_float("CFG scale", params["CFG scale"]),
        seed=_parse_int("Seed", params["Seed"]),
        width=int(size.group(1)),
        height=int(size.group(2)),
        model=params.get("Model") or None,
        styles=styles,
        denoising_strength=strength,
        extra={k: v for k, v in params.items() if k not in _KNOWN_KEYS},
    )


def _parse_int(key: str, value: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise InvalidRequest(f"infotext {key} must be a whole number, got {value!r}") from None


def _parse_float(key: str, value: str) -> float:
    try:
        return float(value.strip())
    except ValueError:
        raise InvalidRequest(f"infotext {key} must be a number, got {value!r}") from None


def infotext_for(
    request: GenerationRequest, *, prompt: str, negative: str, seed: int, model: str
) -> Infotext:
    """The infotext of one image of ``request``, made with the final ``prompt`` and ``seed``.

    Only generation settings go in: the image may be shared, so nothing about who asked.
    LoRAs are written into the prompt as A1111 does (``<lora:name:w>``), after its text.
    """
    p = request.params()
    if request.adapters:
        prompt = f"{prompt} {adapters_tags(request.adapters)}"
    return Infotext(
        prompt=clean_prompt_text(prompt),
        negative=clean_prompt_text(negative),
        steps=p.steps,
        sampler=p.scheduler,
        cfg_scale=p.guidance,
        seed=seed,
        width=p.width,
        height=p.height,
        model=model or None,
        styles=request.styles,
        denoising_strength=request.strength if request.kind in _DENOISING_KINDS else None,
        extra={
            **({EDIT_KEY: request.edit.value} if request.edit is not None else {}),
            **({"ControlNet 0": request.control.infotext()} if request.control is not None else {}),
        },
    )


# PNG text chunks ----------------------------------------------------------------------------

_PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
_TEXT_CHUNKS: Final = frozenset({b"tEXt", b"zTXt", b"iTXt"})


def _chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    """Split a PNG into (type, data) chunks; ValueError when the structure is broken."""
    if not png.startswith(_PNG_SIGNATURE):
        raise ValueError("not a PNG file (bad signature)")
    chunks: list[tuple[bytes, bytes]] = []
    pos = len(_PNG_SIGNATURE)
    while pos + 8 <= len(png):
        length, ctype = struct.unpack(">I4s", png[pos : pos + 8])
        end = pos + 8 + length + 4
        if end > len(png):
            raise ValueError(f"PNG chunk {ctype!r} runs past the end of the file")
        chunks.append((ctype, png[pos + 8 : pos + 8 + length]))
        pos = end
        if ctype == b"IEND":
            return chunks
    raise ValueError("PNG file has no IEND chunk")


def _chunk_bytes(ctype: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(ctype))
    return struct.pack(">I4s", len(data), ctype) + data + struct.pack(">I", crc)


def _text_chunk(key: str, text: str) -> tuple[bytes, bytes]:
    # Pillow's PngInfo.add_text rule, which A1111 relies on: tEXt if latin-1, else iTXt (UTF-8).
    keyword = key.encode("latin-1")
    try:
        return b"tEXt", keyword + b"\0" + text.encode("latin-1")
    except UnicodeEncodeError:
        # keyword, compression flag 0, method 0, empty language tag, empty translated keyword
        return b"iTXt", keyword + b"\0\0\0\0\0" + text.encode("utf-8")


def _inflate(data: bytes) -> bytes | None:
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, MAX_INFOTEXT_BYTES)
    except zlib.error:
        return None
    # Still unconsumed input: it would inflate past the cap, a text-chunk bomb.
    return None if inflater.unconsumed_tail else out


def _read_text_chunk(ctype: bytes, data: bytes) -> tuple[bytes, str | None]:
    """(keyword, text) of a tEXt/zTXt/iTXt chunk; text None when unreadable."""
    keyword, sep, rest = data.partition(b"\0")
    if not sep:
        return keyword, None
    if ctype == b"tEXt":
        return keyword, rest.decode("latin-1")
    if ctype == b"zTXt":
        raw = _inflate(rest[1:]) if rest[:1] == b"\0" else None
        return keyword, None if raw is None else raw.decode("latin-1")
    if len(rest) < 2:
        return keyword, None
    compressed, method, rest = rest[0], rest[1], rest[2:]
    parts = rest.split(b"\0", 2)
    if len(parts) != 3:
        return keyword, None
    body: bytes | None = parts[2]
    if compressed:
        body = _inflate(parts[2]) if method == 0 else None
    if body is None:
        return keyword, None
    try:
        return keyword, body.decode("utf-8")
    except UnicodeDecodeError:
        return keyword, None


def png_with_infotext(image: bytes | Image.Image, text: str) -> bytes:
    """PNG bytes carrying ``text`` under the key "parameters" (replacing any earlier one).

    PNG bytes are spliced, not re-encoded, so pixels and the rest of the file stay as they were.
    """
    if isinstance(image, Image.Image):
        buf = BytesIO()
        image.save(buf, format="PNG")
        png = buf.getvalue()
    else:
        png = image
    keyword = PNG_KEY.encode("latin-1")
    out = [_PNG_SIGNATURE]
    written = False
    for ctype, data in _chunks(png):
        if ctype in _TEXT_CHUNKS and _read_text_chunk(ctype, data)[0] == keyword:
            continue
        if not written and ctype in (b"IDAT", b"IEND"):
            # Before the image data, where readers that stop at IDAT (Pillow's open) find it.
            out.append(_chunk_bytes(*_text_chunk(PNG_KEY, text)))
            written = True
        out.append(_chunk_bytes(ctype, data))
    return b"".join(out)


def read_png_infotext(png: bytes) -> str | None:
    """The "parameters" text of a PNG, or None if it is not a PNG or has none.

    Reads chunks directly: no pixel is decoded and compressed text is capped, so an untrusted
    upload is safe to inspect.
    """
    try:
        chunks = _chunks(png)
    except ValueError:
        return None
    keyword = PNG_KEY.encode("latin-1")
    for ctype, data in chunks:
        if ctype in _TEXT_CHUNKS:
            key, text = _read_text_chunk(ctype, data)
            if key == keyword and text is not None:
                return text
    return None
