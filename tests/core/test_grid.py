"""X/Y/Z grids: parsing the axes, expanding them into cells, A1111's script arguments, and the
contact sheet's layout and labels."""

from __future__ import annotations

from io import BytesIO

import pytest
from PIL import Image

from core.adapters import AdapterRef
from core.errors import InvalidRequest
from core.flags import parse_command
from core.grid import (
    AxisKind,
    a1111_script,
    expand,
    grid_infotext,
    ordered_axes,
    parse_axis,
    split_axes,
)
from core.gridsheet import BACKGROUND, contact_sheet
from core.infotext import read_png_infotext
from core.request import GenerationRequest


def _grid(text: str, max_cells: int = 64):  # type: ignore[no-untyped-def]
    rest, given = split_axes(text)
    return expand(parse_command(rest), ordered_axes(given), max_cells=max_cells)


def test_split_axes_keeps_other_flags_and_reads_each_axis() -> None:
    rest, given = split_axes(
        "a lighthouse --x cfg=3,7,11 --seed 5 --y steps=10,20 --z style=none,watercolor --raw"
    )
    assert rest == "a lighthouse --seed 5 --raw"
    assert given == {"x": "cfg=3,7,11", "y": "steps=10,20", "z": "style=none,watercolor"}
    assert split_axes("a fox --x=seed=1,2")[1] == {"x": "seed=1,2"}


def test_expand_orders_cells_as_a1111_and_fixes_one_seed() -> None:
    grid = _grid("a lighthouse --x cfg=3,7,11 --y steps=10,20 --z style=none,watercolor")
    assert grid.shape == (3, 2, 2)
    assert len(grid.cells) == 12
    # x fastest, then y, then z
    assert [(c.x, c.y, c.z) for c in grid.cells[:4]] == [(0, 0, 0), (1, 0, 0), (2, 0, 0), (0, 1, 0)]
    cell = grid.cells[1 + 1 * 3 + 1 * 6]
    assert cell.request.guidance == 7.0 and cell.request.steps == 20
    assert cell.request.styles == ("watercolor",)
    assert cell.labels == ("CFG Scale: 7", "Steps: 20", "watercolor")
    assert grid.cells[0].request.styles == ()
    seeds = {c.request.seed for c in grid.cells}
    assert len(seeds) == 1 and None not in seeds  # one random seed, the same in every cell
    assert all(c.request.count == 1 for c in grid.cells)


def test_ranges_sizes_samplers_and_seed_axis() -> None:
    assert parse_axis("steps=10-30 (+10)").values == (10, 20, 30)
    assert parse_axis("cfg=1-5 [3]").values == (1.0, 3.0, 5.0)
    assert parse_axis("sampler=euler a, DDIM").values == ("Euler a", "DDIM")
    assert parse_axis("size=512x512, 768x512").values == ((512, 512), (768, 512))
    grid = _grid("a fox --seed 9 --x seed=1,2,3")
    assert [c.request.seed for c in grid.cells] == [1, 2, 3]


def test_prompt_search_replace_and_lora_weight_axes() -> None:
    grid = _grid("a red fox in snow --no red eyes --x sr=red,blue,green")
    assert [c.request.prompt for c in grid.cells] == [
        "a red fox in snow", "a blue fox in snow", "a green fox in snow",
    ]
    assert grid.cells[1].request.negative == "blue eyes"  # A1111 replaces in both
    grid = _grid("a fox --lora ink:0.5 --lora other --x lora:ink=0,0.5,1")
    assert [c.request.adapters for c in grid.cells][2] == (
        AdapterRef(name="other"), AdapterRef(name="ink", weight=1.0),
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a fox", "at least --x"),
        ("a fox --x colour=1,2", "unknown axis 'colour'"),
        ("a fox --x cfg", "NAME=values"),
        ("a fox --x cfg=a,b", "expects numbers"),
        ("a fox --x steps=1.5", "whole numbers"),
        ("a fox --x size=512", "WIDTHxHEIGHT"),
        ("a fox --x sampler=Nope", "unknown scheduler"),
        ("a fox --y cfg=1,2", "give --x first"),
        ("a fox --x cfg=1,2 --y guidance=3,4", "two axes vary CFG Scale"),
        ("a fox --x cfg=1,2 --x steps=1", "given twice"),
        ("a fox --x sr=cat,dog", "'cat' is not in the prompt"),
        ("a fox --n 2 --x cfg=1,2", "one image per cell"),
        ("a fox --style anime,watercolor --x cfg=1,2", "one --style"),
        ("a fox --x cfg=1,2,3 --y steps=1,2,3", "9 cells"),
        ("a fox --x steps=5,500", "cell Steps: 500: steps: must be between 1 and 150"),
        ("a fox --x steps=1-100", "at most 32"),
    ],
)
def test_refusals_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=None) as info:
        _grid(text, max_cells=8)
    assert message in info.value.message


def test_a1111_script_args_both_layouts() -> None:
    # 1.6+: [x_type, x_values, x_dropdown, y_type, ..., draw_legend, include_lone_images, ...]
    script = a1111_script(
        [6, "3, 7", [], 9, "", ["Euler a", "DDIM"], 0, "", [], True, True, False, False, 0]
    )
    assert [a.kind for a in script.axes] == [AxisKind.cfg, AxisKind.sampler]
    assert script.axes[1].values == ("Euler a", "DDIM")
    assert script.include_lone_images is True and script.draw_legend is True
    # before 1.1 (no dropdowns), types by name
    old = a1111_script(["Prompt S/R", "fox,cat", "Seed", "1,2", "Nothing", ""])
    assert [a.kind for a in old.axes] == [AxisKind.prompt, AxisKind.seed]
    # Nothing on x keeps y's place
    gap = a1111_script([0, "", [], 4, "10,20", []])
    assert gap.axes[0].kind is AxisKind.nothing and gap.axes[1].values == (10, 20)
    grid = expand(GenerationRequest(prompt="a fox"), gap.axes, max_cells=8)
    assert grid.shape == (1, 2, 1) and grid.cells[1].labels == ("Steps: 20",)
    with pytest.raises(InvalidRequest, match="'Hires steps' is not supported"):
        a1111_script([5, "1,2"])
    with pytest.raises(InvalidRequest, match="every axis is Nothing"):
        a1111_script([0, "", [], 0, "", []])


def test_infotext_names_the_axes_as_a1111() -> None:
    axes = ordered_axes({"x": "cfg=3,7", "y": "steps=10,20"})
    assert grid_infotext(axes) == (
        'Script: X/Y/Z plot, X Type: CFG Scale, X Values: "3,7", '
        'Y Type: Steps, Y Values: "10,20"'
    )


def _dark(img: Image.Image, box: tuple[int, int, int, int]) -> int:
    region = img.crop(box).convert("L")
    return sum(1 for v in region.getdata() if v < 128)


def test_contact_sheet_layout_labels_and_cells() -> None:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
    cells: list[Image.Image | None] = [Image.new("RGB", (64, 48), c) for c in colours[:5]]
    cells.append(None)  # a failed cell: grey
    png, layout = contact_sheet(
        cells, (3, 2, 1), (["CFG 3", "CFG 7", "CFG 11"], ["Steps 10", "Steps 20"], []),
        infotext="a fox, Script: X/Y/Z plot",
    )
    sheet = Image.open(BytesIO(png)).convert("RGB")
    assert sheet.size == (layout.left + 3 * 64, layout.top + 2 * 48)
    assert layout.top > 0 and layout.left > 0
    for n, colour in enumerate(colours[:5]):
        x, y = n % 3, n // 3
        centre = (layout.left + x * 64 + 32, layout.top + y * 48 + 24)
        assert sheet.getpixel(centre) == colour
    grey = sheet.getpixel((layout.left + 2 * 64 + 32, layout.top + 48 + 24))
    assert grey != BACKGROUND and grey not in colours
    # Each column has its label above it, each row on its left; the corner stays blank.
    for x in range(3):
        assert _dark(sheet, (layout.left + x * 64, 0, layout.left + (x + 1) * 64, layout.top))
    for y in range(2):
        assert _dark(sheet, (0, layout.top + y * 48, layout.left, layout.top + (y + 1) * 48))
    assert _dark(sheet, (0, 0, layout.left, layout.top)) == 0
    assert read_png_infotext(png) == "a fox, Script: X/Y/Z plot"


def test_contact_sheet_z_subgrids_side_by_side() -> None:
    cells: list[Image.Image | None] = [Image.new("RGB", (32, 32), (9, 9, 9)) for _ in range(8)]
    png, layout = contact_sheet(cells, (2, 2, 2), (["a", "b"], ["c", "d"], ["z1", "z2"]))
    sheet = Image.open(BytesIO(png))
    assert layout.gap > 0
    assert sheet.size == (2 * (layout.left + 64) + layout.gap, layout.top + 64)
    with pytest.raises(InvalidRequest, match="needs 8 cells, got 7"):
        contact_sheet(cells[:7], (2, 2, 2), (["a", "b"], ["c", "d"], ["z1", "z2"]))
