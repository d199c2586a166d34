"""Quantization and compile benchmarks on this machine (part of ``bench.engine``): the SD1.5-shaped
UNet per variant (s/step and peak RSS, the same calibration ``atelier devices --measure`` stores)
and the demo model's adherence and pixel drift per variant against bf16."""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.prompts import Blocklist, prepare_prompt
from core.request import GenerationRequest
from core.styles import default_registry
from engine.calibrate import (
    Measurement,
    Variant,
    describe_measurement,
    measure_unet,
    measure_variant,
    unet_case,
)
from engine.demo.quality import GOALS, Case, held_out, load
from engine.demo.score import score
from engine.devices import DeviceProfile, apply_profile
from engine.engine import token_counter

DEMO_MODEL = Path(__file__).resolve().parents[1] / "cluster" / "data" / "demo"
Row = tuple[str, str, float, str]


def unet_rows(m: Measurement) -> list[Row]:
    what = m.shape.replace(" (random weights)", "")
    ref = m.variant("bfloat16")
    rows: list[Row] = []
    for v in m.variants:
        if not v.ok:
            rows.append((what, v.name, float("nan"), f"failed: {v.error}"))
            continue
        ratio = (f"{ref.seconds_per_step / v.seconds_per_step:.2f}x bf16's speed, "  # type: ignore[operator]
                 if ref is not None and ref.ok else "")
        once = f", compile {v.compile_seconds:.0f} s once" if v.compile_seconds else ""
        rows.append((what, v.name, v.seconds_per_step or 0.0,
                     f"{ratio}peak RSS {v.peak_mb:,.0f} MB{once}"))
    return rows


def measure_unet_variants(profile: DeviceProfile, side: int, steps: int) -> Measurement:
    """The calibration's plain and int8 variants of the SD1.5-shaped UNet at ``side``², one
    after another in this process (time per step: the best of ``steps`` after a warm-up)."""
    return measure_unet(profile.device, profile.device_class, side=side, steps=steps,
                        compile=False, progress=lambda v: print(f"  {_line(v)}", flush=True))


def add_compiled(m: Measurement, side: int, steps: int) -> Measurement:
    """``m`` plus the compiled UNet on the fastest plain dtype (inductor: minutes on CPU)."""
    base = m.fastest(lambda v: not v.quantize and not v.compile)
    _, build, inputs = unet_case(side)
    v = measure_variant(build, inputs, Variant(base.dtype if base else "bfloat16", compile=True),
                        steps=steps)
    print(f"  {_line(v)}", flush=True)
    return dataclasses.replace(m, variants=(*m.variants, v))


def _line(v: Variant) -> str:
    if not v.ok:
        return f"{v.name}: failed: {v.error}"
    once = f", compile {v.compile_seconds:.0f} s once" if v.compile_seconds else ""
    return f"{v.name}: {v.seconds_per_step:.3f} s/step, peak {v.peak_mb:,.0f} MB{once}"


def _draw(pipe: Any, cases: list[Case], steps: int, batch: int = 8) -> list[np.ndarray]:
    styles, blocklist = default_registry(), Blocklist()
    count = token_counter(pipe.tokenizer)
    images: list[np.ndarray] = []
    for start in range(0, len(cases), batch):
        chunk = cases[start:start + batch]
        pairs = [prepare_prompt(GenerationRequest(prompt=c.prompt,
                                                  styles=(c.style,) if c.style else ()),
                                styles, blocklist, nsfw_allowed=False, count_tokens=count)[0]
                 for c in chunk]
        out = pipe(prompt=[p for p, _ in pairs], negative_prompt=[n for _, n in pairs],
                   num_inference_steps=steps, guidance_scale=5.0,
                   generator=[torch.Generator().manual_seed(c.seed) for c in chunk],
                   height=64, width=64, output_type="np").images
        images += [np.asarray(img) for img in out]
    return images


def _adherence(cases: list[Case], images: list[np.ndarray]) -> dict[str, float]:
    ok: dict[str, int] = dict.fromkeys(GOALS, 0)
    total: dict[str, int] = dict.fromkeys(GOALS, 0)
    for case, img in zip(cases, images, strict=True):
        result = score((img * 255).round().astype(np.uint8), case.scene)
        for name in GOALS:
            if result.get(name) is not None:
                total[name] += 1
                ok[name] += int(bool(result[name]))
    return {name: 100 * ok[name] / max(total[name], 1) for name in GOALS}


def bench_demo_variants(
    profile: DeviceProfile, n: int, steps: int, *, plain: bool = True, compile: bool = True
) -> list[Row]:
    """The demo model drawn per variant (bf16 first, the reference), ``n`` held-out captions:
    the plain and int8 ones (``plain``), then the compiled one (``compile``)."""
    cases = held_out(n, random.Random(12345))
    bf16 = dataclasses.replace(profile, dtype="bfloat16", quantize=None, compile=False,
                               quantize_backend=None)
    variants = [("bfloat16", bf16)]
    variants += [
        ("float32", dataclasses.replace(bf16, dtype="float32")),
        ("bfloat16+int8", dataclasses.replace(bf16, quantize="int8", quantize_backend="torchao")),
        ("bfloat16+int8-dynamic",
         dataclasses.replace(bf16, quantize="int8-dynamic", quantize_backend="torchao")),
    ] if plain else []
    variants += [("bfloat16+compile", dataclasses.replace(bf16, compile=True))] if compile else []
    what = f"demo model {n} captions {steps} steps"
    ref: list[np.ndarray] | None = None  # bf16's images
    ref_score: dict[str, float] = {}
    rows: list[Row] = []
    for name, p in variants:
        pipe = apply_profile(load(DEMO_MODEL), p)
        _draw(pipe, cases[:8], steps)  # warm-up (and the compile) outside the timing
        start = time.perf_counter()
        images = _draw(pipe, cases, steps)
        took = time.perf_counter() - start
        got = _adherence(cases, images)
        cells = " ".join(f"{k} {v:.1f}%" for k, v in got.items())
        if ref is None:
            ref, ref_score = images, got
        else:  # bf16 ran first: the reference
            diff = float(np.mean([np.abs(a - b).mean() for a, b in zip(images, ref,
                                                                        strict=True)])) * 255
            worst = max(abs(got[k] - ref_score[k]) for k in GOALS)
            cells += f"; vs bf16: |pixel diff| {diff:.2f}/255, adherence moved {worst:.1f} pt"
        rows.append((what, name, took, cells))
        print(f"  {name}: {took:.1f} s, {cells}", flush=True)
        del pipe
    return rows


def print_measurement(m: Measurement) -> None:
    print(describe_measurement(m), flush=True)
