"""The X/Y/Z grid's contact sheet: the cells' images in rows and columns, x labels above,
y labels on the left, one sub-grid per z value side by side under its z label (A1111's layout)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from core.errors import InvalidRequest

BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
MISSING = (200, 200, 200)  # a cell that failed: grey, as A1111 leaves a blank image


@dataclass(frozen=True, slots=True)
class SheetLayout:
    """Where things went: the sheet's size, the label band sizes and the cell box."""

    width: int
    height: int
    cell_width: int
    cell_height: int
    top: int  # the x-label band's height (plus the z band when there are z values)
    left: int  # the y-label band's width
    gap: int  # between z sub-grids


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _lines(text: str, width_chars: int) -> list[str]:
    return textwrap.wrap(text, max(4, width_chars)) or [""]


def contact_sheet(
    cells: Sequence[Image.Image | None],
    shape: tuple[int, int, int],
    labels: tuple[Sequence[str], Sequence[str], Sequence[str]],
    *,
    infotext: str | None = None,
) -> tuple[bytes, SheetLayout]:
    """One PNG of ``cells`` (A1111's order: x fastest, then y, then z; None for a cell with no
    image) laid out ``shape`` = (nx, ny, nz), labelled by ``labels`` (x, y, z; an empty list:
    no band). Cells of different sizes are centred in the largest cell's box."""
    nx, ny, nz = shape
    if len(cells) != nx * ny * nz:
        raise InvalidRequest(f"a {nx}x{ny}x{nz} sheet needs {nx * ny * nz} cells, got {len(cells)}")
    present = [c for c in cells if c is not None]
    cw = max((c.width for c in present), default=64)
    ch = max((c.height for c in present), default=64)
    x_labels, y_labels, z_labels = labels
    size = max(12, min(48, cw // 10))
    font = _font(size)
    line_h = size + size // 3
    chars_per_cell = max(8, int(cw / (size * 0.55)))
    x_rows = max((len(_lines(t, chars_per_cell)) for t in x_labels), default=0)
    z_rows = max((len(_lines(t, chars_per_cell * nx)) for t in z_labels), default=0)
    pad = size // 2
    x_band = x_rows * line_h + 2 * pad if x_labels else 0
    z_band = z_rows * line_h + 2 * pad if z_labels else 0
    left = max(int(cw * 0.75), 4 * size) if y_labels else 0
    gap = size * 2 if nz > 1 else 0
    sub_w = left + nx * cw
    width = nz * sub_w + (nz - 1) * gap
    top = z_band + x_band
    height = top + ny * ch
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)

    def centred(text_lines: list[str], cx: float, y0: float) -> None:
        for n, line in enumerate(text_lines):
            draw.text((cx, y0 + n * line_h), line, fill=INK, font=font, anchor="ma")

    for z in range(nz):
        ox = z * (sub_w + gap)
        if z_labels:
            centred(_lines(z_labels[z], chars_per_cell * nx), ox + left + nx * cw / 2, pad)
        for x in range(nx):
            if x_labels:
                centred(_lines(x_labels[x], chars_per_cell), ox + left + x * cw + cw / 2,
                        z_band + pad)
        for y in range(ny):
            if y_labels:
                rows = _lines(y_labels[y], max(4, int(left / (size * 0.55))))
                y0 = top + y * ch + ch / 2 - len(rows) * line_h / 2
                centred(rows, ox + left / 2, y0)
            for x in range(nx):
                image = cells[x + y * nx + z * nx * ny]
                bx, by = ox + left + x * cw, top + y * ch
                if image is None:
                    draw.rectangle((bx, by, bx + cw - 1, by + ch - 1), fill=MISSING)
                    continue
                sheet.paste(image.convert("RGB"),
                            (bx + (cw - image.width) // 2, by + (ch - image.height) // 2))
    out = BytesIO()
    meta = None
    if infotext:
        meta = PngInfo()
        meta.add_text("parameters", infotext)
    sheet.save(out, format="PNG", pnginfo=meta)
    return out.getvalue(), SheetLayout(width, height, cw, ch, top, left, gap)
