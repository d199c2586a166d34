#!/usr/bin/env bash
# GPU check (a few minutes): the device profile Atelier picks for this CUDA GPU, the denoising
# speed of an SD1.5-shaped model at 512², batch 1 and batch 4, then the calibration variants of
# its UNet (fp16/bf16, torchao int8 weight-only and dynamic, fp8 on sm89+, torch.compile) with
# time per step and peak GPU memory, and the profile that calibration makes. Run from anywhere:
#   bash bench/gpu_check.sh            (PYTHON=/path/to/python to choose the interpreter)
# The variants need torchao (pip install -e '.[quant]'); without it they are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

has_cuda() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    for candidate in .venv/bin/python .venv-gpu/bin/python python3; do
        if command -v "$candidate" >/dev/null && has_cuda "$candidate"; then PY="$candidate"; break; fi
    done
fi
if [[ -z "$PY" ]]; then
    if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
        echo "gpu_check: no CUDA device here (nvidia-smi finds none); run this on a GPU machine." >&2
        exit 1
    fi
    # A GPU but no torch that sees it: a venv on top of the system packages (a CUDA torch there
    # is reused), then the project. PyPI's Linux torch wheels are CUDA builds.
    echo "gpu_check: making .venv-gpu (pip install -e .)" >&2
    python3 -m venv --system-site-packages .venv-gpu
    .venv-gpu/bin/pip install -q -e '.[quant]'
    PY=.venv-gpu/bin/python
    if ! has_cuda "$PY"; then
        echo "gpu_check: torch in .venv-gpu does not see a CUDA device (driver/toolkit mismatch?)" >&2
        exit 1
    fi
fi

PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" - <<'EOF'
import sys
import time

import torch

if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA device; run this on a GPU machine")

from diffusers.utils import logging as diffusers_logging

from engine.devices import (
    apply_profile,
    best_device,
    choose_profile,
    describe_profile,
    detect_devices,
)
from engine.tiny import build_sd15_shaped_pipeline

diffusers_logging.set_verbosity_error()
info = best_device(detect_devices())
profile = choose_profile(info, "sd15")
print(describe_profile(profile), flush=True)

started = time.perf_counter()
pipe = build_sd15_shaped_pipeline(profile.torch_dtype)  # random weights, SD1.5 shapes
apply_profile(pipe, profile)
pipe.set_progress_bar_config(disable=True)
print(f"\nbuilt SD1.5-shaped pipeline in {time.perf_counter() - started:.1f}s", flush=True)

STEPS = 20


def denoise_rate(batch: int) -> float:
    """Denoising steps per second (UNet with CFG + scheduler), text encoding and VAE excluded."""
    marks: list[float] = []

    def tick(p, i, t, kwargs):
        torch.cuda.synchronize()
        marks.append(time.perf_counter())
        return kwargs

    generator = [torch.Generator("cpu").manual_seed(s) for s in range(batch)]
    pipe(["a lighthouse at dusk"] * batch, height=512, width=512, num_inference_steps=STEPS,
         guidance_scale=7.0, generator=generator, callback_on_step_end=tick, output_type="latent")
    # The first step includes the text encoder and kernel warm-up: time from its end.
    return (len(marks) - 1) / (marks[-1] - marks[0])


print(f"\n{'batch':>5}  {'it/s':>7}  {'img/s (denoising only)':>22}")
for batch in (1, 4):
    denoise_rate(batch)  # warm-up: cuDNN autotuning, allocator
    rate = denoise_rate(batch)
    print(f"{batch:>5}  {rate:>7.2f}  {rate * batch / STEPS:>22.2f}", flush=True)
print(f"\npeak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")

# Calibration variants of the UNet alone (CFG batch 2 at 512²), then the profile they make.
import importlib.util

from engine.calibrate import Calibration, describe_measurement, measure_unet, plain_dtypes

del pipe
torch.cuda.empty_cache()
quant = importlib.util.find_spec("torchao") is not None
if not quant:
    print("\ntorchao is not installed: int8/fp8 variants skipped (pip install -e '.[quant]')")
fp8 = quant and (info.capability or (0, 0)) >= (8, 9)
print(f"\ncalibrating {profile.device_class}: UNet variants at 512² "
      f"(fp8 {'on' if fp8 else 'off: needs sm89+'})", flush=True)
m = measure_unet(profile.device, profile.device_class, side=512, steps=5, quant=quant, fp8=fp8,
                 dtypes=plain_dtypes(info.kind, info.bf16),
                 progress=lambda v: print(f"  done {v.name}", flush=True))
print(describe_measurement(m))
chosen = choose_profile(info, "sd15", compile=True, quantize="int8",
                        calibration=Calibration((m,)))
print("profile from it (a model opted into compile and int8):")
for reason in chosen.reasons:
    if reason.split()[0] in ("dtype", "quantize", "compile"):
        print(f"  - {reason}")
EOF
