"""X/Y/Z grids, as AUTOMATIC1111's "X/Y/Z plot": up to three axes, each over one setting (seed,
steps, cfg, sampler, size, style, model, a LoRA's weight or a prompt search/replace), expanded
into one ordinary request per cell. Pure: parsing, expansion and the labels; pricing, running and
the contact sheet are the cluster's."""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from enum import StrEnum
from io import StringIO
from typing import Any

from core.adapters import AdapterRef, check_adapters, parse_adapter
from core.errors import InvalidRequest
from core.request import MAX_SEED, GenerationRequest, build_request, canonical_scheduler
from core.styles import StyleRegistry, style_key

MAX_AXES = 3
AXIS_NAMES = ("x", "y", "z")
MAX_VALUES = 32  # per axis; the settings' max_cells bounds the whole grid


class AxisKind(StrEnum):
    seed = "seed"
    steps = "steps"
    cfg = "cfg"
    sampler = "sampler"
    size = "size"
    style = "style"
    model = "model"
    lora = "lora"  # one adapter's weight: ``lora:ink=0.2,0.6,1``
    prompt = "prompt"  # search/replace: the first value is the search term (A1111's Prompt S/R)
    nothing = "nothing"  # A1111's "Nothing": a placeholder axis of one unlabelled value


# What people type before "=" -> the axis kind (``lora:NAME`` is handled on its own).
_KIND_NAMES: dict[str, AxisKind] = {
    "seed": AxisKind.seed,
    "steps": AxisKind.steps,
    "cfg": AxisKind.cfg,
    "guidance": AxisKind.cfg,
    "sampler": AxisKind.sampler,
    "scheduler": AxisKind.sampler,
    "size": AxisKind.size,
    "style": AxisKind.style,
    "styles": AxisKind.style,
    "model": AxisKind.model,
    "sr": AxisKind.prompt,
    "prompt": AxisKind.prompt,
}
AXIS_HELP = (
    "seed=1,2,3; steps=10,20; cfg=3,7,11; sampler=Euler a,DDIM; size=512x512,768x512; "
    "style=none,watercolor; model=tiny,sdxl; lora:ink=0.2,0.6,1; sr=cat,dog,fox "
    "(prompt search/replace: the first value is the word to replace)"
)

# A1111's ranges: "10-30" (step 1), "10-30 (+5)" (step), "1-9 [5]" (that many, evenly spaced).
_NUM = r"(-?\d+(?:\.\d*)?)"
_RANGE = re.compile(rf"\s*{_NUM}\s*-\s*{_NUM}\s*(?:\(\s*\+?(\d+(?:\.\d*)?)\s*\))?\s*")
_RANGE_COUNT = re.compile(r"\s*(-?\d+(?:\.\d*)?)\s*-\s*(-?\d+(?:\.\d*)?)\s*\[\s*(\d+)\s*\]\s*")
_SIZE = re.compile(r"\s*(\d+)\s*[x×*]\s*(\d+)\s*")
_FLAG = re.compile(r"(?<!\S)(?:--|[\u2014\u2013])(?=[A-Za-z])(\S+)")


@dataclass(frozen=True, slots=True)
class Axis:
    """One axis: its kind, the values each cell along it takes, and their labels."""

    kind: AxisKind
    values: tuple[Any, ...]
    labels: tuple[str, ...]
    lora: str | None = None  # the adapter a ``lora`` axis weighs
    search: str | None = None  # the term a ``prompt`` axis replaces
    text: str = ""  # as given, for the infotext ("X Values")

    @property
    def title(self) -> str:
        """A1111's axis label ("CFG Scale"), for the sheet's infotext."""
        if self.kind is AxisKind.lora:
            return f"LoRA {self.lora} weight"
        return _TITLES[self.kind]


_TITLES = {
    AxisKind.seed: "Seed", AxisKind.steps: "Steps", AxisKind.cfg: "CFG Scale",
    AxisKind.sampler: "Sampler", AxisKind.size: "Size", AxisKind.style: "Styles",
    AxisKind.model: "Checkpoint name", AxisKind.prompt: "Prompt S/R", AxisKind.lora: "LoRA",
    AxisKind.nothing: "Nothing",
}
NOTHING = Axis(AxisKind.nothing, (None,), ())


@dataclass(frozen=True, slots=True)
class Cell:
    """One cell: its place (x, y, z), its request and the labels of its place."""

    x: int
    y: int
    z: int
    request: GenerationRequest
    labels: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Grid:
    """A base request and up to three axes; ``cells`` in A1111's order (x fastest, then y)."""

    base: GenerationRequest
    axes: tuple[Axis, ...]
    cells: tuple[Cell, ...]

    @property
    def shape(self) -> tuple[int, int, int]:
        return axes_shape(self.axes)

    def label_lists(self) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
        return axes_labels(self.axes)

    def describe(self) -> str:
        return describe_axes(self.axes)


def axes_shape(axes: tuple[Axis, ...]) -> tuple[int, int, int]:
    """How many values along x, y and z (1 for an axis not given)."""
    sizes = [len(a.values) for a in axes] + [1] * (MAX_AXES - len(axes))
    return sizes[0], sizes[1], sizes[2]


def axes_labels(
    axes: tuple[Axis, ...],
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """The labels along x, y and z (empty for an axis not given)."""
    labels = [a.labels for a in axes] + [()] * (MAX_AXES - len(axes))
    return labels[0], labels[1], labels[2]


def describe_axes(axes: tuple[Axis, ...]) -> str:
    """``3 x 2 grid: cfg x steps``: one line for a status message."""
    dims = " x ".join(str(n) for n in axes_shape(axes)[: max(1, len(axes))])
    names = " x ".join(a.kind.value if a.lora is None else f"lora:{a.lora}" for a in axes
                       if a.kind is not AxisKind.nothing)
    return f"{dims} grid: {names}" if names else f"{dims} grid"


def split_values(text: str) -> list[str]:
    """Comma-separated values, CSV-quoted where a value holds a comma (as A1111 reads them)."""
    rows = list(csv.reader(StringIO(text), skipinitialspace=True))
    return [v.strip() for row in rows for v in row if v.strip()]


def _number(text: str, axis: str, *, whole: bool) -> float:
    candidate = text.strip()
    try:
        value = float(candidate)
    except ValueError:
        raise InvalidRequest(f"{axis} axis: expects numbers, got {text!r}") from None
    if whole and not value.is_integer():
        raise InvalidRequest(f"{axis} axis: expects whole numbers, got {text!r}")
    return value


def _expand_ranges(items: list[str], axis: str, *, whole: bool) -> list[float]:
    out: list[float] = []
    for item in items:
        counted = _RANGE_COUNT.fullmatch(item)
        ranged = _RANGE.fullmatch(item) if counted is None else None
        if counted is not None:
            start, end = float(counted.group(1)), float(counted.group(2))
            n = int(counted.group(3))
            if not 1 <= n <= MAX_VALUES:
                raise InvalidRequest(f"{axis} axis: [{n}] must be between 1 and {MAX_VALUES}")
            values = [start + (end - start) * i / (n - 1) for i in range(n)] if n > 1 else [start]
            out.extend(float(int(v)) if whole else round(v, 4) for v in values)
        elif ranged is not None and not item.strip().startswith("-"):
            start, end = float(ranged.group(1)), float(ranged.group(2))
            step = float(ranged.group(3)) if ranged.group(3) else 1.0
            if step <= 0 or end < start:
                raise InvalidRequest(f"{axis} axis: range {item!r} must go upwards")
            count = math.floor((end - start) / step + 1e-9) + 1
            if count > MAX_VALUES:
                raise InvalidRequest(
                    f"{axis} axis: range {item!r} gives {count} values; at most {MAX_VALUES}"
                )
            out.extend(round(start + i * step, 4) for i in range(count))
        else:
            out.append(_number(item, axis, whole=whole))
    return out


def _label(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def parse_axis(text: str, registry: StyleRegistry | None = None) -> Axis:
    """``cfg=3,7,11`` (or ``lora:ink=0.2,0.8``, ``sr=cat,dog``) as an Axis; InvalidRequest
    naming the bad part. Values are checked as far as a request can check them alone."""
    name, eq, rest = text.partition("=")
    name = name.strip().lower()
    if not eq or not name:
        raise InvalidRequest(f"an axis is NAME=values, got {text.strip()!r}; e.g. {AXIS_HELP}")
    lora: str | None = None
    if name.startswith(("lora:", "lora.")):
        kind = AxisKind.lora
        lora = parse_adapter(name[5:], f"axis {name}").name
    elif name in _KIND_NAMES:
        kind = _KIND_NAMES[name]
    else:
        raise InvalidRequest(f"unknown axis {name!r}; axes are: {AXIS_HELP}")
    items = split_values(rest)
    if not items:
        raise InvalidRequest(f"{name} axis has no values, e.g. {name}=1,2,3")
    search: str | None = None
    values: list[Any]
    labels: list[str]
    if kind is AxisKind.seed:
        nums = _expand_ranges(items, name, whole=True)
        for v in nums:
            if not 0 <= v <= MAX_SEED:
                raise InvalidRequest(f"seed axis: seeds are 0 to {MAX_SEED}, got {_label(v)}")
        values = [int(v) for v in nums]
        labels = [f"Seed: {v}" for v in values]
    elif kind is AxisKind.steps:
        values = [int(v) for v in _expand_ranges(items, name, whole=True)]
        labels = [f"Steps: {v}" for v in values]
    elif kind is AxisKind.cfg:
        values = _expand_ranges(items, name, whole=False)
        labels = [f"CFG Scale: {_label(v)}" for v in values]
    elif kind is AxisKind.lora:
        values = _expand_ranges(items, name, whole=False)
        labels = [f"{lora}: {_label(v)}" for v in values]
    elif kind is AxisKind.sampler:
        try:
            values = [canonical_scheduler(v) for v in items]
        except InvalidRequest as exc:
            raise InvalidRequest(f"sampler axis: {exc.message}") from None
        labels = list(values)
    elif kind is AxisKind.size:
        sizes: list[tuple[int, int]] = []
        for item in items:
            m = _SIZE.fullmatch(item)
            if m is None:
                raise InvalidRequest(f"size axis: expects WIDTHxHEIGHT like 512x768, got {item!r}")
            sizes.append((int(m.group(1)), int(m.group(2))))
        values = sizes
        labels = [f"{w}x{h}" for w, h in sizes]
    elif kind is AxisKind.style:
        styled: list[tuple[str, ...]] = []
        for item in items:
            names = [style_key(s) for s in item.split("+") if s.strip()]
            if names in ([], ["none"]):
                styled.append(())
                continue
            if registry is not None:
                names = [registry.get(n).name for n in names]
            styled.append(tuple(names))
        values = styled
        labels = ["+".join(v) if v else "no style" for v in styled]
    elif kind is AxisKind.model:
        values = list(items)
        labels = list(items)
    else:  # prompt S/R
        search = items[0]
        values = list(items)
        labels = list(items)
    if len(values) > MAX_VALUES:
        raise InvalidRequest(f"{name} axis has {len(values)} values; at most {MAX_VALUES}")
    return Axis(kind, tuple(values), tuple(labels), lora=lora, search=search, text=rest.strip())


def split_axes(text: str) -> tuple[str, dict[str, str]]:
    """A grid command's text without its ``--x/--y/--z`` flags, and those flags' values by
    axis name; every other flag stays for ``core.flags`` to read."""
    axes: dict[str, str] = {}
    kept: list[str] = []
    matches = list(_FLAG.finditer(text))
    position = 0
    for i, m in enumerate(matches):
        name = m.group(1).split("=", 1)[0].lower()
        if name not in AXIS_NAMES:
            continue
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        _, eq, inline = m.group(1).partition("=")
        value = (inline + text[m.end() : end]) if eq else text[m.end() : end]
        if name in axes:
            raise InvalidRequest(f"--{name} is given twice; give each axis once")
        axes[name] = value.strip()
        kept.append(text[position : m.start()])
        position = end
    kept.append(text[position:])
    return " ".join(" ".join(kept).split()), axes


def ordered_axes(given: dict[str, str], registry: StyleRegistry | None = None) -> tuple[Axis, ...]:
    """The given axes as x, y, z (a y needs an x, a z a y); InvalidRequest when none or a gap."""
    if not given:
        raise InvalidRequest(f"a grid needs at least --x, e.g. --x cfg=3,7,11; axes: {AXIS_HELP}")
    unknown = sorted(set(given) - set(AXIS_NAMES))
    if unknown:
        raise InvalidRequest(f"unknown axis flag --{unknown[0]}; use --x, --y and --z")
    present = [n for n in AXIS_NAMES if n in given]
    if present != list(AXIS_NAMES[: len(present)]):
        raise InvalidRequest("give --x first, then --y, then --z (a --z needs a --y)")
    axes = tuple(parse_axis(given[n], registry) for n in present)
    check_distinct(axes)
    return axes


def check_distinct(axes: tuple[Axis, ...]) -> None:
    """InvalidRequest when two axes vary the same setting."""
    kinds = [(a.kind, a.lora) for a in axes]
    for i, k in enumerate(kinds):
        if k[0] is not AxisKind.nothing and k in kinds[:i]:
            raise InvalidRequest(f"two axes vary {axes[i].title}; each axis needs its own setting")


def _apply(fields: dict[str, Any], axis: Axis, value: Any) -> None:
    if axis.kind is AxisKind.nothing:
        return
    if axis.kind is AxisKind.seed:
        fields["seed"] = value
    elif axis.kind is AxisKind.steps:
        fields["steps"] = value
    elif axis.kind is AxisKind.cfg:
        fields["guidance"] = value
    elif axis.kind is AxisKind.sampler:
        fields["scheduler"] = value
    elif axis.kind is AxisKind.size:
        fields["width"], fields["height"] = value
    elif axis.kind is AxisKind.style:
        fields["styles"] = value
    elif axis.kind is AxisKind.model:
        fields["model"] = value
    elif axis.kind is AxisKind.lora:
        refs = [r for r in fields["adapters"] if r.name != axis.lora]
        fields["adapters"] = check_adapters((*refs, AdapterRef(name=str(axis.lora), weight=value)))
    else:
        search = str(axis.search)
        # A1111 replaces in the prompt and the negative; the search term itself is the first cell.
        fields["prompt"] = fields["prompt"].replace(search, value)
        fields["negative"] = fields["negative"].replace(search, value)


def expand(base: GenerationRequest, axes: tuple[Axis, ...], *, max_cells: int) -> Grid:
    """Every cell's request: ``base`` with each axis's value applied, one image each, all with
    the base's seed (a random one, fixed once, when it has none) unless seed is an axis.
    InvalidRequest naming the cell's values when one is not a valid request."""
    if len(axes) > MAX_AXES:
        raise InvalidRequest(f"a grid has at most {MAX_AXES} axes, got {len(axes)}")
    if base.count != 1:
        raise InvalidRequest(f"a grid makes one image per cell; drop --n (count {base.count})")
    varies_style = any(a.kind is AxisKind.style for a in axes)
    if len(base.styles) > 1 and not varies_style:
        raise InvalidRequest(
            "a grid makes one image per cell: give one --style, or put the styles on an axis "
            f"(--x style={','.join(base.styles)})"
        )
    for axis in axes:
        search = axis.search or ""
        if axis.kind is AxisKind.prompt and search not in base.prompt \
                and search not in base.negative:
            raise InvalidRequest(
                f"prompt S/R: {axis.search!r} is not in the prompt; the first value is the "
                "words to replace"
            )
    sizes = [len(a.values) for a in axes] + [1] * (MAX_AXES - len(axes))
    total = math.prod(sizes)
    if total > max_cells:
        raise InvalidRequest(
            f"this grid has {total} cells ({' x '.join(str(n) for n in sizes[: len(axes)])}); "
            f"a grid may have at most {max_cells}"
        )
    base = base.with_seed()
    template = base.model_dump(exclude={"init_image", "mask"})
    template["init_image"], template["mask"] = base.init_image, base.mask
    cells: list[Cell] = []
    for z in range(sizes[2]):
        for y in range(sizes[1]):
            for x in range(sizes[0]):
                fields = dict(template)
                fields["adapters"] = base.adapters
                place = (x, y, z)
                labels = []
                for n, axis in enumerate(axes):
                    _apply(fields, axis, axis.values[place[n]])
                    if axis.labels:
                        labels.append(axis.labels[place[n]])
                try:
                    request = build_request(**fields)
                except InvalidRequest as exc:
                    raise InvalidRequest(f"cell {', '.join(labels)}: {exc.message}") from None
                cells.append(Cell(x, y, z, request, tuple(labels)))
    return Grid(base, axes, tuple(cells))


def grid_infotext(axes: tuple[Axis, ...]) -> str:
    """The axes as A1111 writes them in a grid's infotext: ``Script: X/Y/Z plot, X Type: ...``."""
    parts = ["Script: X/Y/Z plot"]
    for name, axis in zip(("X", "Y", "Z"), axes, strict=False):
        if axis.kind is AxisKind.nothing:
            continue
        values = axis.text.replace('"', "'")
        parts.append(f'{name} Type: {axis.title}, {name} Values: "{values}"')
    return ", ".join(parts)


# A1111's X/Y/Z plot axis types for txt2img, by the index its API takes (1.6 to 1.9 number them
# so); those Atelier can vary map to an axis kind, the others are refused by name.
A1111_AXIS_TYPES: tuple[str, ...] = (
    "Nothing", "Seed", "Var. seed", "Var. strength", "Steps", "Hires steps", "CFG Scale",
    "Prompt S/R", "Prompt order", "Sampler", "Hires sampler", "Checkpoint name",
    "Negative Guidance minimum sigma", "Sigma Churn", "Sigma min", "Sigma max", "Sigma noise",
    "Schedule type", "Schedule min sigma", "Schedule max sigma", "Schedule rho", "Eta",
    "Clip skip", "Denoising", "Initial noise multiplier", "Extra noise", "Hires upscaler", "VAE",
    "Styles",
)
_A1111_KINDS: dict[str, AxisKind] = {
    "nothing": AxisKind.nothing, "seed": AxisKind.seed, "steps": AxisKind.steps,
    "cfg scale": AxisKind.cfg, "prompt s/r": AxisKind.prompt, "sampler": AxisKind.sampler,
    "checkpoint name": AxisKind.model, "styles": AxisKind.style,
}


@dataclass(frozen=True, slots=True)
class XyzScript:
    """A1111's X/Y/Z plot script call: the axes (x, y, z; "Nothing" kept in place), and
    whether the cells' own images come back after the grid."""

    axes: tuple[Axis, ...]
    include_lone_images: bool
    draw_legend: bool


def _a1111_kind(value: object, where: str) -> AxisKind:
    if isinstance(value, bool):
        raise InvalidRequest(f"{where}: expects an axis type index or name, got {value!r}")
    if isinstance(value, int):
        if not 0 <= value < len(A1111_AXIS_TYPES):
            raise InvalidRequest(f"{where}: no axis type {value}")
        label = A1111_AXIS_TYPES[value]
    elif isinstance(value, str):
        label = value.strip()
    else:
        raise InvalidRequest(f"{where}: expects an axis type index or name, got {value!r}")
    kind = _A1111_KINDS.get(label.casefold())
    if kind is None:
        supported = ", ".join(t for t in A1111_AXIS_TYPES if t.casefold() in _A1111_KINDS)
        raise InvalidRequest(f"{where}: axis type {label!r} is not supported; use one of: "
                             f"{supported}")
    return kind


_ARG_NAMES = {AxisKind.prompt: "sr", AxisKind.cfg: "cfg", AxisKind.model: "model"}


def a1111_script(args: list[Any], registry: StyleRegistry | None = None) -> XyzScript:
    """A1111's ``script_args`` for "x/y/z plot" as an XyzScript. Both layouts are read: since
    1.1 (``[x_type, x_values, x_values_dropdown, y_type, ..., z_values_dropdown, draw_legend,
    include_lone_images, include_sub_grids, no_fixed_seeds, margin_size, csv_mode, ...]``)
    and before (no dropdowns). A dropdown list, when given, is the axis's values."""
    if not isinstance(args, list) or len(args) < 2:
        raise InvalidRequest("script_args: the X/Y/Z plot takes [x_type, x_values, ...]")
    # With dropdowns, the third item is a list (or null); without, the Y type (an int or str).
    dropdowns = len(args) > 2 and (args[2] is None or isinstance(args[2], list))
    stride = 3 if dropdowns else 2
    axes: list[Axis] = []
    for n, name in enumerate(("x", "y", "z")):
        base = n * stride
        if base + 1 >= len(args):
            break
        kind = _a1111_kind(args[base], f"script_args[{base}] ({name} type)")
        values = args[base + 1]
        dropdown = args[base + 2] if dropdowns and base + 2 < len(args) else None
        if isinstance(dropdown, list) and dropdown:
            values = ",".join(_csv_value(str(v)) for v in dropdown)
        if kind is AxisKind.nothing:
            axes.append(NOTHING)
            continue
        if not isinstance(values, str):
            raise InvalidRequest(f"script_args[{base + 1}] ({name} values): expects text, "
                                 f"got {values!r}")
        try:
            axes.append(parse_axis(f"{_ARG_NAMES.get(kind, kind.value)}={values}", registry))
        except InvalidRequest as exc:
            raise InvalidRequest(f"script_args[{base + 1}] ({name} values): {exc.message}") \
                from None
    while axes and axes[-1].kind is AxisKind.nothing:
        axes.pop()
    if not axes:
        raise InvalidRequest("script_args: every axis is Nothing; give at least one axis")
    check_distinct(tuple(axes))
    flags = args[3 * stride :]

    def flag(i: int, default: bool) -> bool:
        return bool(flags[i]) if i < len(flags) and flags[i] is not None else default

    return XyzScript(tuple(axes), include_lone_images=flag(1, False), draw_legend=flag(0, True))


def _csv_value(value: str) -> str:
    return f'"{value}"' if "," in value else value
