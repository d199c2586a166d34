"""The shipped demo ControlNet (cluster/data/demo-canny, ``atelier models train-demo-controlnet``):
the catalogue gives it to ``--model demo --control canny`` and to no other model; and, run
through the engine and read back by the demo scorer, a circle's outline drawn on the left of the
control picture puts the red circle on the left even where the caption says right, where the
same prompt without control follows the caption."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from cluster.contract import BatchItem
from cluster.registry import ModelRegistry
from core.control import ControlUnit, control_png
from core.errors import InvalidRequest
from core.images import validate_image
from core.request import GenerationRequest
from core.settings import load_settings
from engine.cache import ModelCache
from engine.demo.controlnet import DEMO_CONTROLNET_DIR
from engine.demo.score import Found, read
from engine.devices import DeviceProfile
from engine.engine import Engine

PROMPT = "a red circle on the right on a white background"
SEEDS = (1, 2, 3, 4)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    return ModelRegistry.load(
        load_settings(data_dir=tmp_path_factory.mktemp("demo-cn"), _env_file=None))


def outline_on_the_left(side: int = 256) -> bytes:
    """A person's drawing: a black circle's outline on white, in the left half."""
    img = Image.new("RGB", (side, side), "white")
    r, cx, cy = side * 0.17, side * 0.27, side * 0.5
    ImageDraw.Draw(img).ellipse((cx - r, cy - r, cx + r, cy + r), outline="black",
                                width=max(2, side // 64))
    return validate_image(control_png(img), max_bytes=10**7, max_pixels=10**7).png


def test_the_demo_model_gets_its_own_controlnet(registry: ModelRegistry) -> None:
    spec = registry.adapters["demo-canny"]
    assert (spec.kind, spec.preprocessor, spec.models) == ("controlnet", "canny", ("demo",))
    assert Path(spec.file) == DEMO_CONTROLNET_DIR
    asked = GenerationRequest(prompt="a red circle", model="demo",
                              control=ControlUnit(preprocessor="canny", image=b"png"))
    unit = registry.resolve_control(asked).control
    assert unit is not None and unit.controlnet == "demo-canny"


def test_no_other_model_takes_the_demo_controlnet(registry: ModelRegistry) -> None:
    # sd15 is of the demo model's family, but its UNet is another shape.
    plain = GenerationRequest(prompt="a boat", model="sd15",
                              control=ControlUnit(preprocessor="canny", image=b"png"))
    with pytest.raises(InvalidRequest, match="no ControlNet for canny fits model 'sd15'"):
        registry.resolve_control(plain)
    named = plain.model_copy(update={"control": ControlUnit(controlnet="demo-canny",
                                                            image=b"png")})
    with pytest.raises(InvalidRequest, match="'demo-canny' is for model 'demo' only"):
        registry.resolve_control(named)


@pytest.mark.slow
@pytest.mark.pipelines
def test_the_outline_decides_where_the_circle_goes(
    registry: ModelRegistry, cpu_profile: DeviceProfile
) -> None:
    engine = Engine(ModelCache(registry, cpu_profile, 10**9, offline=True), profile=cpu_profile)
    control = ControlUnit(preprocessor="canny", image=outline_on_the_left())

    def red_circles(with_control: bool) -> list[Found | None]:
        items = []
        for seed in SEEDS:
            request = GenerationRequest(prompt=PROMPT, model="demo", width=64, height=64,
                                        steps=20, seed=seed, scheduler="Euler", guidance=5.0,
                                        control=control if with_control else None)
            items.append(BatchItem(f"job-{seed}", registry.resolve_control(request)))
        return [read(Image.open(io.BytesIO(r.png))).shape("red")
                for r in engine.generate(items)]

    def left_and_round(found: Found | None) -> bool:
        return found is not None and found.x < 0.5 and found.kind == "circle"

    plain = red_circles(with_control=False)
    steered = red_circles(with_control=True)
    # Without control the caption decides: a red circle on the right.
    assert sum(f is not None and f.x > 0.5 and f.kind == "circle" for f in plain) >= 3, plain
    # With it the outline does: on the left, and round.
    assert sum(left_and_round(f) for f in steered) >= 3, steered
