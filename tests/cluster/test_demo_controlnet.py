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
            request = GenerationRequest(prompt=PROMPT, model="demo", width=128, height=128,
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


@pytest.mark.pipelines
def test_training_goes_on_from_a_controlnet_for_smaller_pictures(tmp_path: Path) -> None:
    """``train-demo-controlnet --set init_from=FOLDER`` where FOLDER's conditioning embedding
    halves its maps fewer times than the base model's pictures need (the 64² demo-canny
    before issue 27): every other weight is carried over, its embedding's stages too, and the
    saved ControlNet turns a 128² map into the 16x16 latent grid. An embedding that does not
    fit the base model is an error that says which would."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    from engine.demo.controlnet import (
        ControlRecipe,
        build_controlnet,
        carry_controlnet,
        train_demo_controlnet,
    )
    from engine.demo.train import Recipe, train_demo

    train_demo(tmp_path / "demo", Recipe(pool=32, vae_steps=4, vae_batch=4, max_steps=1,
                                         batch=4), progress=lambda _: None)
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "demo" / "unet")
    old = build_controlnet(unet, ControlRecipe(embedding=(16, 32, 32)))
    torch.nn.init.normal_(old.controlnet_down_blocks[0].weight)  # not zero: a trained one
    old.save_pretrained(tmp_path / "old")
    new = carry_controlnet(old, unet, ControlRecipe())
    old_state, new_state = old.state_dict(), new.state_dict()
    for key, value in old_state.items():  # the new stages (blocks 4, 5) are the only others
        assert torch.equal(value, new_state[key]), key
    assert new.controlnet_cond_embedding(torch.rand(1, 3, 128, 128)).shape[-2:] == (16, 16)

    small = ControlRecipe(pool=16, batch=2, max_steps=2, minutes=5, init_from=str(tmp_path / "old"),
                          base=str(tmp_path / "demo"))
    record = train_demo_controlnet(tmp_path / "cn", small, progress=lambda _: None, check=0)
    assert record["steps"] == 2
    saved = ControlNetModel.from_pretrained(tmp_path / "cn")
    assert tuple(saved.config.conditioning_embedding_out_channels) == (16, 32, 32, 32)
    with pytest.raises(ValueError, match=r"halves a map 2 times.*needs 3 \(e\.g\. "
                                         r"embedding=16,32,32,32\)"):
        train_demo_controlnet(tmp_path / "bad", ControlRecipe(
            pool=4, max_steps=1, embedding=(16, 32, 32), base=str(tmp_path / "demo")),
            progress=lambda _: None, check=0)
