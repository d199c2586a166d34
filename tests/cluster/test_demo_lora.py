"""The shipped demo LoRA (cluster/data/demo-lora, ``atelier models train-demo-lora``): small,
with its recipe, saved as Diffusers saves a LoRA; through the engine's batch path the demo
model draws the captions' shapes as outlines with it and filled without it (the scorer's
``fill_ratio`` reads which), the rest of the caption still drawn; and the training code, on a
budget of seconds, writes a LoRA the engine loads."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cluster.adapters import AdapterSpec
from cluster.contract import BatchItem
from cluster.registry import DEMO_LORA_DIR, ModelRegistry
from core.adapters import AdapterRef
from core.request import GenerationRequest
from core.settings import load_settings
from engine.cache import ModelCache
from engine.demo.lora import LORA_FILE
from engine.demo.scenes import parse_caption
from engine.demo.score import fill_ratio, outlined, score
from engine.devices import DeviceProfile
from engine.engine import Engine

# The demo model draws 8 x 128² in 20 steps per batch: minutes on a busy 2-core box.
pytestmark = [pytest.mark.pipelines, pytest.mark.timeout(600)]

# One batch of eight people's captions, one and two shapes, every background different.
CAPTIONS = [
    "a red circle on a blue background", "a blue square on a yellow background",
    "a yellow star on a purple background", "a white triangle on a red background",
    "a orange circle to the left of a green square on a white background",
    "a green square above a red star on a black background",
    "a purple circle on the left on a orange background",
    "a yellow square below a blue circle on a green background",
]
OUTLINE = (AdapterRef(name="outline"),)  # at its default weight


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, cpu_profile: DeviceProfile) -> Engine:
    settings = load_settings(data_dir=tmp_path_factory.mktemp("demo-lora"), _env_file=None)
    registry = ModelRegistry.load(settings)  # the packaged demo model and its LoRA
    return Engine(ModelCache(registry, cpu_profile, 10**9, offline=True), profile=cpu_profile)


def _batch(engine: Engine, adapters: tuple[AdapterRef, ...] = ()) -> list[Image.Image]:
    items = [BatchItem(f"job-{n}", GenerationRequest(prompt=c, model="demo", seed=40 + n,
                                                     adapters=adapters))
             for n, c in enumerate(CAPTIONS)]
    return [Image.open(io.BytesIO(r.png)).convert("RGB") for r in engine.generate(items)]


def test_the_demo_lora_is_shipped_small_with_its_recipe() -> None:
    from safetensors import safe_open

    path = DEMO_LORA_DIR / LORA_FILE
    assert path.stat().st_size <= 1024 * 1024
    with safe_open(str(path), "pt") as fh:
        keys = list(fh.keys())
    assert keys and all(k.startswith("unet.") and "lora" in k for k in keys)
    record = json.loads((DEMO_LORA_DIR / "recipe.json").read_text())
    assert {"recipe", "steps", "minutes", "machine", "torch"} <= set(record)
    assert record["recipe"]["look"] == "line-art" and record["steps"] > 0


def test_with_the_lora_shapes_are_outlines_and_without_they_are_filled(engine: Engine) -> None:
    scenes = [parse_caption(c) for c in CAPTIONS]
    plain = _batch(engine)
    lined = _batch(engine, OUTLINE)
    without = [outlined(img, s) for img, s in zip(plain, scenes, strict=True)]
    with_it = [outlined(img, s) for img, s in zip(lined, scenes, strict=True)]
    ratios = [(fill_ratio(a, s), fill_ratio(b, s)) for a, b, s in zip(plain, lined, scenes,
                                                                      strict=True)]
    # Where a shape's inside can be read, it is an outline's (a thin ring may leave too little
    # inside to tell: None).
    assert sum(v is True for v in with_it) >= 5 and False not in with_it, ratios
    assert without == [False] * len(CAPTIONS), ratios
    # The LoRA changes how shapes are drawn, not what the caption asked for.
    for image, scene in zip(lined, scenes, strict=True):
        assert scene is not None
        found = score(image, scene)
        assert found["background"] and found["colour"], (scene.caption, found)
    # Off again: exactly the pictures from before it was loaded.
    again = _batch(engine)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain, again,
                                                                            strict=True))
    assert engine.adapters.loaded(engine.cache.get("demo")) == ["outline"]


def test_the_weight_scales_the_effect(engine: Engine) -> None:
    """The mean fill ratio over the batch rises from the LoRA's at weight 1 towards the base
    model's at 0."""
    scenes = [parse_caption(c) for c in CAPTIONS]
    means = []
    for weight in (1.0, 0.5, 0.0):
        images = _batch(engine, (AdapterRef(name="outline", weight=weight),))
        ratios = [fill_ratio(img, s) for img, s in zip(images, scenes, strict=True)]
        means.append(float(np.mean([r for r in ratios if r is not None])))
    assert means[0] < means[1] <= means[2] and means[0] < means[2] - 0.3, means


def test_training_writes_a_lora_the_engine_loads(tmp_path: Path, cpu_profile: DeviceProfile,
                                                 engine: Engine) -> None:
    """``atelier models train-demo-lora``'s code on a budget of seconds: a safetensors file
    Diffusers' ``load_lora_weights`` reads into the demo model, and its recipe."""
    import torch

    from cluster.registry import DEMO_MODEL_DIR
    from engine.demo.lora import TARGETS, LoraRecipe, train_demo_lora

    threads = torch.get_num_threads()
    try:
        recipe = replace(LoraRecipe(), pool=16, batch=2, max_steps=2)
        record = train_demo_lora(DEMO_MODEL_DIR, tmp_path / "mine", recipe, progress=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    assert record["steps"] == 2 and record["recipe"]["rank"] == 4
    saved = json.loads((tmp_path / "mine" / "recipe.json").read_text())
    assert saved["steps"] == 2 and saved["recipe"]["targets"] == list(TARGETS)
    registry = engine.cache.registry.with_adapters(AdapterSpec(
        name="mine", file=str(tmp_path / "mine" / LORA_FILE), family="sd15", models=("demo",)))
    fresh = Engine(ModelCache(registry, cpu_profile, 10**9, offline=True), profile=cpu_profile)
    request = GenerationRequest(prompt=CAPTIONS[0], model="demo", seed=1, steps=2,
                                adapters=(AdapterRef(name="mine", weight=1.0),))
    (result,) = fresh.generate([BatchItem("t", request)])
    assert result.png and fresh.adapters.loaded(fresh.cache.get("demo")) == ["mine"]
    with pytest.raises(ValueError, match="look must be one of line-art"):
        LoraRecipe().with_overrides(["look=crayon"])
    with pytest.raises(ValueError, match="'rank=big': 'big' is not a int"):
        LoraRecipe().with_overrides(["rank=big"])
