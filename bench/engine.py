"""Engine benchmarks on this machine's CPU (a script, not a test): the chosen profile vs naive fp32
on an SD1.5-shaped UNet, one batched engine call vs separate calls, and fast mode (step caching)
vs normal, LoRA adapters (switch cost cached vs first load; 8 jobs in 2 adapter sets batched
vs one at a time), and quantization and compile per variant (``--quant``: only those, see
bench/quant.py). Prints a table.

Run from the repository root: ``.venv/bin/python -m bench.engine [--quick] [--loras-only]``
(about 3-4 minutes on 2 cores; ``--quick`` about half; ``--loras-only`` under a minute).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from cluster.contract import BatchItem
from cluster.registry import FAMILY_DEFAULTS, Family, ModelRegistry, ModelSpec
from core.request import GenerationRequest
from core.settings import load_settings
from engine.cache import ModelCache
from engine.calibrate import Calibration
from engine.devices import DeviceProfile, best_device, choose_profile, describe_profile
from engine.engine import Engine
from engine.tiny import SD15_UNET, build_sd15_shaped_pipeline, make_tiny_lora, make_tiny_models

PROMPTS = ("a lighthouse at dusk", "a red fox in snow", "a bowl of ramen", "a castle on a hill")
Row = tuple[str, str, float, str]  # benchmark, variant, seconds, note


def timed_pair(
    a: Callable[[], Any], b: Callable[[], Any], reps: int, *, warmup: bool = True
) -> tuple[float, float]:
    """Best wall time of ``a`` and of ``b`` over ``reps`` alternating runs (after one warm-up
    each). Alternating and taking the minimum keep a noisy, shared machine from favouring one."""
    if warmup:
        a()
        b()
    best_a = best_b = float("inf")
    for _ in range(reps):
        for fn, slot in ((a, 0), (b, 1)):
            start = time.perf_counter()
            fn()
            took = time.perf_counter() - start
            if slot == 0:
                best_a = min(best_a, took)
            else:
                best_b = min(best_b, took)
    return best_a, best_b


# (a) profile dtype vs naive fp32 -------------------------------------------------------------


def bench_dtype(profile: DeviceProfile, reps: int, side: int = 256) -> list[Row]:
    """N UNet forward passes with CFG batch 2 at ``side``² (latents side/8)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).eval()  # fp32, as naive code would run it
    latents = torch.randn(2, 4, side // 8, side // 8)
    text = torch.randn(2, 77, 768)  # SD1.5's text embeddings: 77 tokens x 768

    def forward(model: Any, dtype: torch.dtype) -> Callable[[], Any]:
        def run() -> Any:
            with torch.inference_mode():
                return model(latents.to(dtype), 500, encoder_hidden_states=text.to(dtype))

        return run

    # The profile's choices: its dtype (a cast copy; the fp32 one stays for alternating runs),
    # layout and threads.
    fast = copy.deepcopy(unet).to(profile.torch_dtype)
    if profile.channels_last:
        fast.to(memory_format=torch.channels_last)
    if profile.threads:
        torch.set_num_threads(profile.threads)
    naive, chosen = timed_pair(
        forward(unet, torch.float32), forward(fast, profile.torch_dtype), reps
    )
    ratio = naive / chosen
    goal = "meets" if ratio >= 2 else "misses"
    what = f"UNet fwd CFG x2 {side}²"
    return [
        (what, "naive float32", naive, ""),
        (what, f"profile {profile.dtype}", chosen, f"{ratio:.2f}x faster ({goal} the 2x goal)"),
    ]


# (b) one call of batch 4 vs four calls of batch 1 -----------------------------------------------


def items(n: int, model: str, side: int, steps: int, offset: int = 0) -> list[BatchItem]:
    return [
        BatchItem(
            f"job-{offset + i}",
            GenerationRequest(
                prompt=PROMPTS[i % len(PROMPTS)], model=model, width=side, height=side,
                steps=steps, seed=1000 + offset + i, scheduler="Euler",
            ),
        )
        for i in range(n)
    ]


def bench_batching(engine: Engine, model: str, side: int, steps: int, reps: int) -> list[Row]:
    batch = items(4, model, side, steps)
    singles = [items(1, model, side, steps, offset=i) for i in range(4)]
    # Load the model and warm up outside the timing (a full warm-up pair costs a rep on SD).
    engine.generate(items(1, model, side, steps))
    engine.generate(items(2, model, side, steps))
    four_calls, one_call = timed_pair(
        lambda: [engine.generate(s) for s in singles], lambda: engine.generate(batch), reps,
        warmup=False,
    )
    what = f"{model} {side}² {steps} steps, 4 images"
    return [
        (what, "4 calls of batch 1", four_calls, f"{4 / four_calls:.2f} img/s"),
        (
            what,
            "1 call of batch 4",
            one_call,
            f"{4 / one_call:.2f} img/s, {four_calls / one_call:.2f}x the 4 calls",
        ),
    ]


# (c) fast mode (DeepCache-style step caching) vs normal ------------------------------------------


def bench_fast(normal: Engine, fast: Engine, side: int, steps: int, reps: int) -> list[Row]:
    batch = items(1, "sd15-shaped", side, steps)
    normal.generate(items(1, "sd15-shaped", side, 1))  # load + warm up outside the timing
    fast.generate(items(1, "sd15-shaped", side, 1))
    plain, cached = timed_pair(
        lambda: normal.generate(batch), lambda: fast.generate(batch), reps, warmup=False
    )
    a, b = normal.generate(batch)[0].png, fast.generate(batch)[0].png
    what = f"sd15-shaped {side}² {steps} steps, 1 image"
    return [
        (what, "normal", plain, ""),
        (what, "fast mode (step cache)", cached,
         f"{plain / cached:.2f}x faster; mean |pixel diff| {mean_abs_diff(a, b):.1f}/255"),
    ]


# (d) LoRA adapters: switching a cached one vs loading it; batches per adapter set ---------------


def bench_loras(engine: Engine, data_dir: Path, reps: int) -> list[Row]:
    from cluster.adapters import AdapterSpec
    from core.adapters import AdapterRef

    models = data_dir / "models" / "tiny-sd15"
    specs = [
        AdapterSpec(name=n, file=str(make_tiny_lora(models, data_dir / n, seed=i)), family="sd15")
        for i, n in enumerate(("ink", "neon"))
    ]
    engine.adapters.adapters = {s.name: s for s in specs}
    pipe = engine.cache.get("tiny")
    ink, neon = (AdapterRef(name=s.name, weight=1.0) for s in specs)
    first = cached = float("inf")
    for _ in range(max(3, reps)):
        engine.adapters.unload(pipe, "ink")
        start = time.perf_counter()
        engine.adapters.apply(pipe, (ink,))  # read from disk, inject, activate
        first = min(first, time.perf_counter() - start)
        engine.adapters.apply(pipe, (neon,))
        start = time.perf_counter()
        engine.adapters.apply(pipe, (ink,))  # both loaded: only set_adapters
        cached = min(cached, time.perf_counter() - start)
    engine.adapters.apply(pipe, ())

    def job(i: int) -> BatchItem:
        lora = "<lora:ink:1>" if i % 2 else "<lora:neon:1>"
        request = GenerationRequest(prompt=f"{PROMPTS[i % 4]} {lora}", model="tiny", width=64,
                                    height=64, steps=4, seed=2000 + i, scheduler="Euler")
        return BatchItem(f"lora-{i}", request)

    jobs = [job(i) for i in range(8)]
    sets = [jobs[1::2], jobs[0::2]]  # the ink jobs, the neon jobs
    singles, batched = timed_pair(
        lambda: [engine.generate([j]) for j in jobs], lambda: [engine.generate(s) for s in sets],
        reps,
    )
    what = "tiny 64² LoRA (UNet attention, rank 4)"
    return [
        (what, "switch: first load", first, "load_lora_weights + set_adapters"),
        (what, "switch: cached", cached, f"set_adapters only, {first / cached:.0f}x cheaper"),
        (what + ", 8 jobs", "8 calls of 1 (sets alternate)", singles,
         f"{8 / singles:.2f} img/s"),
        (what + ", 8 jobs", "2 calls of 4 (one per set)", batched,
         f"{8 / batched:.2f} img/s, {singles / batched:.2f}x"),
    ]


def mean_abs_diff(a: bytes, b: bytes) -> float:
    import io

    import numpy as np
    from PIL import Image

    def arr(png: bytes) -> Any:
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)

    return float(np.abs(arr(a) - arr(b)).mean())


def tiny_engine(profile: DeviceProfile, data_dir: Path) -> Engine:
    make_tiny_models(data_dir / "models")
    registry = ModelRegistry.load(load_settings(data_dir=data_dir, _env_file=None))
    return Engine(ModelCache(registry, profile, 2**30, offline=True), profile=profile)


def sd15_shaped_engine(profile: DeviceProfile, data_dir: Path, *, fast: bool = False) -> Engine:
    """An engine whose "sd15-shaped" model is built in memory (random weights, real shapes)."""
    spec = ModelSpec(
        **FAMILY_DEFAULTS[Family.sd15], name="sd15-shaped", family=Family.sd15,
        path=data_dir / "sd15-shaped",  # never read: the loader below builds it
    )

    def build(spec: ModelSpec, *, torch_dtype: torch.dtype, **_: Any) -> Any:
        return build_sd15_shaped_pipeline(torch_dtype)

    if fast:
        profile = dataclasses.replace(profile, fast=True)
    cache = ModelCache(ModelRegistry([spec]), profile, 2**34, loader=build, offline=True)
    return Engine(cache, profile=profile)


def print_table(rows: list[Row]) -> None:
    widths = [max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)]
    print(f"\n{'benchmark':<{widths[0]}}  {'variant':<{widths[1]}}  {'seconds':>8}  note")
    for what, variant, seconds, note in rows:
        print(f"{what:<{widths[0]}}  {variant:<{widths[1]}}  {seconds:>8.3f}  {note}")


def quant_main(profile: DeviceProfile, args: argparse.Namespace) -> None:
    """Side by side in this run: UNet variants, demo variants, then the compiled ones (slowest
    to build, so last: what finished before a deadline is already printed)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    from bench.quant import (
        add_compiled,
        bench_demo_variants,
        measure_unet_variants,
        print_measurement,
        unet_rows,
    )

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    steps = 2 if args.quick else 3
    if args.demo_only:  # the fidelity figures alone (the UNet timings need a quiet machine)
        demo = bench_demo_variants(profile, args.demo_n, args.demo_steps, compile=False)
        if not args.no_compile:
            demo += bench_demo_variants(profile, args.demo_n, args.demo_steps, plain=False)
        print_table(demo)
        return
    print(f"UNet variants at {args.side}²", flush=True)
    measured = measure_unet_variants(profile, args.side, steps)
    print("demo model variants", flush=True)
    demo = bench_demo_variants(profile, args.demo_n, args.demo_steps, compile=False)
    if not args.no_compile:
        print("compiled (inductor)", flush=True)
        measured = add_compiled(measured, args.side, steps)
        demo += bench_demo_variants(profile, args.demo_n, args.demo_steps, plain=False)
    print_measurement(measured)
    calibrated = choose_profile(best_device(), "sd15", compile=True, quantize="int8",
                                calibration=Calibration((measured,)))
    print("profile from this measurement (a model opted into compile and int8):")
    print("\n".join(f"  - {r}" for r in calibrated.reasons
                    if r.split()[0] in ("dtype", "quantize", "compile")))
    print_table(unet_rows(measured) + demo)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (~half the time)")
    parser.add_argument("--loras-only", action="store_true", help="only the LoRA benchmarks")
    parser.add_argument("--quant", action="store_true",
                        help="only the quantization/compile variants (UNet and demo model)")
    parser.add_argument("--demo-n", type=int, default=48, help="--quant: demo captions (x8)")
    parser.add_argument("--demo-steps", type=int, default=20, help="--quant: demo steps")
    parser.add_argument("--side", type=int, default=256, help="--quant: UNet image side")
    parser.add_argument("--no-compile", action="store_true", help="--quant: skip compile")
    parser.add_argument("--demo-only", action="store_true",
                        help="--quant: only the demo model's adherence and drift per variant")
    args = parser.parse_args(argv)
    reps_unet, reps_tiny, reps_sd = (1, 3, 1) if args.quick else (3, 5, 2)

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its dtype-cast notices would break up the table
    profile = choose_profile(best_device(), "sd15")
    print(describe_profile(profile))
    started = time.perf_counter()
    if args.loras_only:
        with tempfile.TemporaryDirectory() as tmp:
            rows = bench_loras(tiny_engine(profile, Path(tmp)), Path(tmp), reps_tiny)
        print_table(rows)
        return
    if args.quant:
        quant_main(profile, args)
        print(f"\ntotal {time.perf_counter() - started:.0f}s")
        return
    rows = bench_dtype(profile, reps_unet)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = tiny_engine(profile, Path(tmp))
        rows += bench_batching(tiny, "tiny", 64, 4, reps_tiny)
        rows += bench_loras(tiny, Path(tmp), reps_tiny)
        sd15 = sd15_shaped_engine(profile, Path(tmp))
        rows += bench_batching(sd15, "sd15-shaped", 256, 2, reps_sd)
        rows += bench_fast(sd15, sd15_shaped_engine(profile, Path(tmp), fast=True), 256, 10,
                           reps_sd)
    print_table(rows)
    print(f"\ntotal {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
