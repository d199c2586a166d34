"""How many ControlNets a worker keeps loaded is the device profile's decision (with its reason,
shown by ``atelier devices``), and the engine's ControlNet cache keeps exactly that many."""

from __future__ import annotations

import dataclasses
import io
from typing import TYPE_CHECKING

import pytest
from PIL import Image, ImageDraw

from cluster.adapters import AdapterSpec
from cluster.contract import BatchItem
from core.control import ControlUnit, control_png
from core.images import validate_image
from core.request import GenerationRequest
from engine.cache import ModelCache
from engine.controlnets import MAX_KEPT, kept_for
from engine.devices import DeviceInfo, DeviceProfile, choose_profile, describe_profile
from engine.engine import Engine
from engine.tiny import make_tiny_controlnet
from tests.cluster.test_devices import A100, GTX1650, MPS, RTX2070, RTX4090, cpu

if TYPE_CHECKING:
    from tests.cluster.conftest import TinyModels


@pytest.mark.parametrize(
    ("info", "family", "kept"),
    [
        (A100, "sd15", MAX_KEPT),  # 80 GB: capped
        (A100, "sdxl", 7),  # (80 - 10) GB / 4 at 2.5 GB each
        (RTX4090, "sd15", 6),  # (24 - 6) / 4 at 0.75
        (RTX4090, "sdxl", 1),  # (24 - 10) / 4 at 2.5: one
        (RTX2070, "sdxl", 1),  # model offload
        (GTX1650, "sdxl", 1),  # sequential offload
        (MPS, "sd15", 3),  # 16 GB unified, half precision
        (cpu(bf16=True), "sd15", MAX_KEPT),  # 32 GB of RAM, bf16
        (cpu(bf16=False), "sdxl", 1),  # fp32 SDXL: (32 - 20) / 4 at 5 GB
    ],
)
def test_the_profile_decides_the_controlnets_kept(info: DeviceInfo, family: str, kept: int
                                                  ) -> None:
    profile = choose_profile(info, family)
    assert profile.controlnet_slots == kept
    (why,) = [r for r in profile.reasons if r.startswith("controlnets kept")]
    assert why.startswith(f"controlnets kept {kept}:")
    assert f"controlnets  {kept} kept loaded" in describe_profile(profile)
    assert f"  - {why}" in describe_profile(profile)


def test_more_memory_never_keeps_fewer() -> None:
    kept = [kept_for("cuda", gb, xl=True, half=True, offload="none")[0]
            for gb in (8, 12, 16, 24, 40, 48, 80, 141)]
    assert kept == sorted(kept) and kept[0] == 1 and kept[-1] == MAX_KEPT
    assert kept_for("cpu", None, xl=False, half=True, offload="none") == (
        1, "controlnets kept 1: the cpu device's memory is unknown")
    why = kept_for("cuda", 24, xl=False, half=True, offload="model")[1]
    assert "offload model" in why


def _picture(box: tuple[int, int, int, int]) -> bytes:
    img = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(img).ellipse(box, fill="white")
    return validate_image(control_png(img), max_bytes=10**6, max_pixels=10**6).png


@pytest.mark.pipelines
def test_the_engine_keeps_as_many_as_the_profile_says(
    tiny_models: TinyModels, cpu_profile: DeviceProfile, tmp_path_factory: pytest.TempPathFactory
) -> None:
    folder = make_tiny_controlnet(tiny_models.sd15, tmp_path_factory.mktemp("cn") / "a", seed=3)
    registry = tiny_models.registry.with_adapters(*(
        AdapterSpec(name=name, kind="controlnet", file=str(folder), family="sd15",
                    preprocessor="canny")
        for name in ("first", "second")
    ))
    picture = _picture((4, 20, 28, 44))

    def run(engine: Engine, name: str) -> None:
        unit = ControlUnit(controlnet=name, preprocessor="canny", image=picture)
        request = GenerationRequest(prompt="a red circle", model="tiny", width=64, height=64,
                                    steps=1, seed=1, control=unit)
        (result,) = engine.generate([BatchItem(f"job-{name}", request)])
        assert Image.open(io.BytesIO(result.png)).size == (64, 64)

    for slots, loads in ((1, 3), (2, 2)):
        profile = dataclasses.replace(cpu_profile, controlnet_slots=slots)
        engine = Engine(ModelCache(registry, profile, 10**9, offline=True), profile=profile)
        assert engine.controlnets.capacity == slots
        for name in ("first", "second", "first"):
            run(engine, name)
        # One slot: "first" was unloaded for "second" and loaded again (its pipeline view
        # went with it, not keeping its weights alive); two: both kept.
        assert engine.controlnets.loads == loads
