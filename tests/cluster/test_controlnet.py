"""ControlNet in the engine, on the tiny pipeline with a tiny random ControlNet built offline: the
control picture steers the output, the same way every time; two people's jobs with different
control pictures share one call and each gets its own; admission names a wrong unit."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image, ImageDraw

from cluster.adapters import AdapterSpec
from cluster.contract import BatchItem
from cluster.registry import ModelRegistry
from core.control import ControlUnit, control_png
from core.errors import InvalidRequest
from core.images import validate_image
from core.infotext import parse_infotext
from core.recipe import batch_key
from core.request import GenerationRequest
from engine.cache import ModelCache
from engine.devices import DeviceProfile
from engine.engine import Engine
from engine.tiny import make_tiny_controlnet

if TYPE_CHECKING:
    from tests.cluster.conftest import TinyModels


@pytest.fixture(scope="module")
def registry(tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    d = tmp_path_factory.mktemp("controlnets")
    edges = make_tiny_controlnet(tiny_models.sd15, d / "edges", seed=1)
    return tiny_models.registry.with_adapters(
        AdapterSpec(name="tiny-canny", kind="controlnet", file=str(edges), family="sd15",
                    preprocessor="canny"),
        AdapterSpec(name="tiny-lines", kind="controlnet", file=str(edges), family="sd15",
                    preprocessor="scribble"),
        AdapterSpec(name="gone-canny", kind="controlnet", file=str(d / "gone"), family="sdxl",
                    preprocessor="canny"),
    )


@pytest.fixture(scope="module")
def engine(registry: ModelRegistry, cpu_profile: DeviceProfile) -> Engine:
    return Engine(ModelCache(registry, cpu_profile, 10**9, offline=True), profile=cpu_profile)


def picture(box: tuple[int, int, int, int]) -> bytes:
    img = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(img).ellipse(box, fill="white")
    return validate_image(control_png(img), max_bytes=10**6, max_pixels=10**6).png


LEFT, RIGHT = picture((4, 20, 28, 44)), picture((36, 20, 60, 44))


def req(control: ControlUnit | None = None, seed: int = 7) -> GenerationRequest:
    return GenerationRequest(prompt="a red circle", model="tiny", width=64, height=64, steps=2,
                             seed=seed, control=control)


def unit(image: bytes = LEFT, **over: object) -> ControlUnit:
    return ControlUnit(controlnet="tiny-canny", preprocessor="canny", image=image, **over)  # type: ignore[arg-type]


def run(engine: Engine, *requests: GenerationRequest) -> list[np.ndarray]:
    items = [BatchItem(f"job-{i}", r) for i, r in enumerate(requests)]
    return [np.asarray(Image.open(io.BytesIO(r.png)).convert("RGB"), dtype=np.int16)
            for r in engine.generate(items)]


def test_the_control_picture_steers_the_output(engine: Engine) -> None:
    (plain,) = run(engine, req())
    (left,) = run(engine, req(unit(LEFT)))
    (right,) = run(engine, req(unit(RIGHT)))
    assert np.abs(left - plain).mean() > 1 and np.abs(left - right).mean() > 1
    (again,) = run(engine, req(unit(LEFT)))
    assert np.array_equal(again, left)  # deterministic
    # Weight 0 leaves the picture as without control (but for float noise).
    (off,) = run(engine, req(unit(LEFT, weight=0.0)))
    assert np.abs(off - plain).max() <= 2
    # Plain jobs after a ControlNet one are untouched by it.
    (after,) = run(engine, req())
    assert np.array_equal(after, plain)
    assert engine.controlnets.loads == 1


def test_two_peoples_control_pictures_share_one_call(engine: Engine) -> None:
    a, b = req(unit(LEFT), seed=1), req(unit(RIGHT), seed=2)
    assert batch_key(a) == batch_key(b)  # one ControlNet, one weight: one call
    together = run(engine, a, b)
    alone = [run(engine, a)[0], run(engine, b)[0]]
    for got, want in zip(together, alone, strict=True):
        assert np.abs(got - want).max() <= 2
    assert batch_key(a) != batch_key(req(unit(LEFT, weight=0.5)))
    assert batch_key(a) != batch_key(req())


def test_infotext_records_the_unit_as_a1111_does(engine: Engine) -> None:
    (result,) = engine.generate([BatchItem("j", req(unit(LEFT, weight=0.8, end=0.6)))])
    extra = parse_infotext(result.infotext).extra
    assert extra["ControlNet 0"] == (
        "Module: canny, Model: tiny-canny, Weight: 0.8, Resize Mode: Crop and Resize, "
        "Threshold A: 100, Threshold B: 200, Guidance Start: 0, Guidance End: 0.6"
    )


def test_admission_resolves_and_names_a_wrong_unit(registry: ModelRegistry) -> None:
    by_kind = registry.resolve_control(req(ControlUnit(preprocessor="scribble", image=LEFT)))
    assert by_kind.control is not None and by_kind.control.controlnet == "tiny-lines"
    named = registry.resolve_control(req(ControlUnit(controlnet="tiny-lines", image=LEFT)))
    assert named.control is not None and named.control.preprocessor == "scribble"
    with pytest.raises(InvalidRequest, match="unknown ControlNet 'tiny-cany'.*did you mean"):
        registry.resolve_control(req(ControlUnit(controlnet="tiny-cany", image=LEFT)))
    with pytest.raises(InvalidRequest, match="'gone-canny' is for sdxl models; model 'tiny'"):
        registry.resolve_control(req(ControlUnit(controlnet="gone-canny", image=LEFT)))
    with pytest.raises(InvalidRequest, match="no ControlNet for none fits model 'tiny'"):
        registry.resolve_control(req(ControlUnit(preprocessor="none", image=LEFT)))
