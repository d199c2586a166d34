"""Fast mode (DeepCache-style step caching) on the tiny pipelines of both families: the deep
blocks really are skipped on cached steps, each pipeline call starts afresh, and a call whose
every step is a full step gives exactly the images of normal mode."""

from __future__ import annotations

import dataclasses
import io
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image

from cluster.contract import BatchItem, ImageResult
from core.request import GenerationRequest
from engine.cache import ModelCache
from engine.devices import DeviceProfile
from engine.engine import Engine
from engine.stepcache import StepCache, install_step_cache

if TYPE_CHECKING:
    from tests.cluster.conftest import TinyModels

MODELS = {"sd15": "tiny", "sdxl": "tiny-xl"}


def items(model: str, steps: int, n: int = 2) -> list[BatchItem]:
    return [
        BatchItem(
            f"job-{i}",
            GenerationRequest(
                prompt="a lighthouse at dusk", model=model, width=64, height=64, steps=steps,
                seed=99 + i, scheduler="Euler",
            ),
        )
        for i in range(n)
    ]


def pixels(result: ImageResult) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.png)).convert("RGB"), dtype=np.int16)


def engine_for(tiny_models: TinyModels, profile: DeviceProfile) -> Engine:
    return Engine(ModelCache(tiny_models.registry, profile, 10**9, offline=True), profile=profile)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_fast_mode_skips_the_deep_blocks_on_cached_steps(
    tiny_models: TinyModels, cpu_profile: DeviceProfile, family: str
) -> None:
    model = MODELS[family]
    fast = engine_for(tiny_models, dataclasses.replace(cpu_profile, fast=True))
    normal = engine_for(tiny_models, cpu_profile)
    unet = fast.cache.get(model).unet
    cache = unet._atelier_step_cache
    assert isinstance(cache, StepCache)
    mid_calls = 0

    def count(*_: object) -> None:
        nonlocal mid_calls
        mid_calls += 1

    # A hook on the wrapped module sees every call; the wrapper decides what runs inside.
    inner = unet.mid_block.resnets[0]
    inner.register_forward_pre_hook(count)

    first = fast.generate(items(model, steps=6))
    # 6 steps, interval 3: full steps 0 and 3, cached 1, 2, 4, 5.
    assert (cache.full_steps, cache.cached_steps) == (2, 4)
    assert mid_calls == 2
    again = fast.generate(items(model, steps=6))
    assert (cache.full_steps, cache.cached_steps) == (4, 8)  # a fresh start, not step 6..11
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(pixels(a), pixels(b)), "the kept features leaked between calls"

    plain = normal.generate(items(model, steps=6))
    differs = [np.abs(pixels(a) - pixels(b)).max() for a, b in zip(first, plain, strict=True)]
    assert max(differs) > 0, "cached steps changed nothing: the deep blocks were not skipped"

    # One step is always a full step: exactly the normal images.
    one_fast, one_plain = fast.generate(items(model, 1)), normal.generate(items(model, 1))
    for a, b in zip(one_fast, one_plain, strict=True):
        assert np.array_equal(pixels(a), pixels(b))


def test_a_new_batch_shape_forces_a_full_step(
    tiny_models: TinyModels, cpu_profile: DeviceProfile
) -> None:
    fast = engine_for(tiny_models, dataclasses.replace(cpu_profile, fast=True))
    unet = fast.cache.get("tiny").unet
    cache = unet._atelier_step_cache
    fast.generate(items("tiny", steps=2, n=1))
    full = cache.full_steps
    cache.step = 1  # as if the previous call had been cut off after its first step
    fast.generate(items("tiny", steps=2, n=3))  # reset() plus a new shape: starts full
    assert cache.full_steps == full + 1
    assert install_step_cache(unet) is cache  # installing twice wraps once
