"""The quantized (torchao int8) and compiled (inductor) paths of ``apply_profile`` on the tiny
pipelines: they run, produce images, and stay close to the plain pipeline's."""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch

from cluster.contract import BatchItem
from cluster.registry import ModelRegistry
from core.request import GenerationRequest
from engine.cache import ModelCache
from engine.calibrate import Calibration, Measurement, Variant
from engine.devices import DeviceInfo, apply_profile, choose_profile
from engine.engine import Engine
from engine.tiny import build_tiny_pipeline

if TYPE_CHECKING:
    from tests.cluster.conftest import TinyModels

pytest.importorskip("torchao")

CPU = DeviceInfo(
    kind="cpu", name="CPU", total_memory=32 * 2**30, bf16=False, cpu_bf16=False, cores=1,
    logical_cpus=1, quant_backends=("torchao",),
)


def draw(pipe: Any) -> Any:
    out = pipe("a red fox in snow", num_inference_steps=2, width=64, height=64,
               output_type="np", generator=torch.Generator().manual_seed(3))
    return out.images


def quantized_linears(module: torch.nn.Module) -> int:
    return sum(type(m.weight).__name__ != "Parameter" and type(m.weight) is not torch.Tensor
               for m in module.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("mode", ["int8", "int8-dynamic"])
def test_quantized_pipeline_makes_an_image(family: str, mode: str) -> None:
    plain = draw(apply_profile(build_tiny_pipeline(family),  # type: ignore[arg-type]
                               choose_profile(CPU, family)))
    profile = choose_profile(CPU, family, quantize="int8")
    assert (profile.quantize, profile.quantize_backend) == ("int8", "torchao")
    profile = dataclasses.replace(profile, quantize=mode)  # what a calibration may choose
    pipe = apply_profile(build_tiny_pipeline(family), profile)  # type: ignore[arg-type]
    # The UNet's and every text encoder's linear layers now hold int8 weights.
    assert quantized_linears(pipe.unet) > 0
    assert quantized_linears(pipe.text_encoder) > 0
    if family == "sdxl":
        assert quantized_linears(pipe.text_encoder_2) > 0
    images = draw(pipe)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    # int8 weights move pixels a little, not a lot (values are 0..1).
    assert float(np.abs(images - plain).mean()) < 0.05


def test_compiled_pipeline_makes_the_same_image() -> None:
    """torch.compile on the tiny UNet through dynamo with the "eager" backend: the path
    apply_profile takes, without inductor's C++ build (on 2 busy cores inductor needs ~2 min
    even for the tiny UNet; bench.engine --quant times it on the SD1.5-shaped one)."""
    plain = draw(apply_profile(build_tiny_pipeline("sd15"), choose_profile(CPU, "sd15")))
    profile = dataclasses.replace(choose_profile(CPU, "sd15"), compile=True,
                                  compile_backend="eager")
    pipe = apply_profile(build_tiny_pipeline("sd15"), profile)
    assert pipe.unet._compiled_call_impl is not None
    images = draw(pipe)
    assert images.shape == (1, 64, 64, 3)
    assert float(np.abs(images - plain).mean()) < 1e-4


def test_worker_cache_quantizes_what_the_calibration_chose(tiny_models: TinyModels) -> None:
    """A model that opts into int8, a calibration where int8 was fastest: the cache's profile
    for it quantizes, and the engine's images come from the int8 UNet."""
    spec = tiny_models.registry.get("tiny").model_copy(update={"quantize": "int8"})
    cal = Calibration((Measurement("cpu", "sd15", "test", "2026-12-06T21:00:00Z", "2.13.0", (
        Variant("float32", seconds_per_step=1.0), Variant("bfloat16", seconds_per_step=2.0),
        Variant("float32", "int8", seconds_per_step=0.5),
    )),))
    profile = choose_profile(CPU, "sd15")
    cache = ModelCache(ModelRegistry([spec]), profile, 10**9, device_info=CPU, offline=True,
                       calibration=cal)
    chosen = cache.profile_of("tiny")
    assert (chosen.dtype, chosen.quantize, chosen.quantize_backend) == (
        "float32", "int8", "torchao")
    results = Engine(cache, profile=profile).generate([BatchItem("job-1", GenerationRequest(
        prompt="a fox", model="tiny", width=64, height=64, steps=2, seed=7))])
    assert len(results) == 1 and results[0].png.startswith(b"\x89PNG")
    assert quantized_linears(cache.get("tiny").unet) > 0


def test_engine_reports_the_first_compiled_call_once(
    tiny_models: TinyModels, caplog: pytest.LogCaptureFixture
) -> None:
    profile = dataclasses.replace(choose_profile(CPU, "sd15"), compile=True,
                                  compile_backend="eager")
    engine = Engine(ModelCache(tiny_models.registry, profile, 10**9, offline=True),
                    profile=profile)
    item = BatchItem("job-1", GenerationRequest(prompt="a fox", model="tiny", width=64,
                                                height=64, steps=2, seed=7))
    with caplog.at_level(logging.INFO, logger="engine.engine"):
        engine.generate([item])
        first = dict(engine.compile_seconds)
        engine.generate([dataclasses.replace(item, job_id="job-2")])
    assert list(first) == ["tiny"] and first["tiny"] > 0
    assert engine.compile_seconds == first  # reported once, not per batch
    lines = [r.getMessage() for r in caplog.records if "compiled UNet" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("compiled UNet of tiny: first call took")
