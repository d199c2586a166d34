"""The quantized (torchao int8) and compiled (inductor) paths of ``apply_profile`` on the tiny
pipelines: they run, produce images, and stay close to the plain pipeline's."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch

from cluster.devices import DeviceInfo, apply_profile, choose_profile
from cluster.tiny import build_tiny_pipeline

pytest.importorskip("torchao")

CPU = DeviceInfo(
    kind="cpu", name="CPU", total_memory=32 * 2**30, bf16=False, cpu_bf16=False, cores=1,
    logical_cpus=1, quant_backends=("torchao",),
)


def draw(pipe: Any, family: str = "sd15") -> Any:
    out = pipe("a red fox in snow", num_inference_steps=2, width=64, height=64,
               output_type="np", generator=torch.Generator().manual_seed(3))
    return out.images


def quantized_linears(module: torch.nn.Module) -> int:
    return sum(type(m.weight).__name__ != "Parameter" and type(m.weight) is not torch.Tensor
               for m in module.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("mode", ["int8", "int8-dynamic"])
def test_quantized_pipeline_makes_an_image(family: str, mode: str) -> None:
    plain = draw(apply_profile(build_tiny_pipeline(family), choose_profile(CPU, family)))  # type: ignore[arg-type]
    profile = choose_profile(CPU, family, quantize="int8")
    assert (profile.quantize, profile.quantize_backend) == ("int8", "torchao")
    profile = dataclasses.replace(profile, quantize=mode)  # what a calibration may choose
    pipe = apply_profile(build_tiny_pipeline(family), profile)  # type: ignore[arg-type]
    # The UNet's and every text encoder's linear layers now hold int8 weights.
    assert quantized_linears(pipe.unet) > 0
    assert quantized_linears(pipe.text_encoder) > 0
    if family == "sdxl":
        assert quantized_linears(pipe.text_encoder_2) > 0
    images = draw(pipe, family)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    # int8 weights move pixels a little, not a lot (values are 0..1).
    assert float(np.abs(images - plain).mean()) < 0.05


@pytest.mark.slow
def test_compiled_pipeline_makes_the_same_image() -> None:
    """inductor on the tiny UNet (compile takes ~10-30 s on 2 busy cores)."""
    plain = draw(apply_profile(build_tiny_pipeline("sd15"), choose_profile(CPU, "sd15")))
    profile = dataclasses.replace(choose_profile(CPU, "sd15"), compile=True)
    pipe = apply_profile(build_tiny_pipeline("sd15"), profile)
    assert pipe.unet._compiled_call_impl is not None
    images = draw(pipe)
    assert images.shape == (1, 64, 64, 3)
    assert float(np.abs(images - plain).mean()) < 1e-3
