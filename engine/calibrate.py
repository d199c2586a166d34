"""Device calibration: speed and peak memory of one UNet per variant (fp32/bf16, int8 weight-only,
int8 dynamic, compiled), measured here and stored as JSON beside the data dir, so that
``choose_profile`` picks what was fastest on this device class instead of assuming it."""

from __future__ import annotations

import gc
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import AtelierError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"
INDUCTOR_CACHE_DIR = "inductor-cache"  # beside calibration.json: torch.compile's kernels
INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
FORMAT = 1
PLAIN_DTYPES = ("float32", "bfloat16")
QUANT_MODES = ("int8", "int8-dynamic")  # int8 weights; int8 weights and dynamic int8 activations
FP8_MODE = "fp8"  # fp8 weights and dynamic fp8 activations: CUDA sm89+ (Ada, Hopper) only


class CalibrationError(AtelierError):
    """A calibration file that cannot be read or does not hold what it should."""

    code = "bad_calibration"


@dataclass(frozen=True)
class Variant:
    """One way of running the UNet, and what it measured. ``error`` when it could not run."""

    dtype: str
    quantize: str | None = None
    compile: bool = False
    seconds_per_step: float | None = None
    peak_mb: float | None = None  # peak RSS (cpu) / allocated (cuda) while running, weights in
    compile_seconds: float | None = None  # the first call's extra time (compile only)
    error: str | None = None

    @property
    def name(self) -> str:
        parts = [self.dtype, *([self.quantize] if self.quantize else []),
                 *(["compile"] if self.compile else [])]
        return "+".join(parts)

    @property
    def ok(self) -> bool:
        return self.error is None and self.seconds_per_step is not None


@dataclass(frozen=True)
class Measurement:
    """The variants of one model family's UNet measured on one device class."""

    device_class: str
    family: str
    shape: str  # what ran, e.g. "sd15-shaped UNet, CFG x2 at 256²"
    measured_at: str
    torch_version: str
    variants: tuple[Variant, ...]

    def variant(self, name: str) -> Variant | None:
        return next((v for v in self.variants if v.name == name), None)

    def fastest(self, allowed: Callable[[Variant], bool] = lambda v: True) -> Variant | None:
        runs = [v for v in self.variants if v.ok and allowed(v)]
        return min(runs, key=lambda v: v.seconds_per_step or 0.0) if runs else None


@dataclass(frozen=True)
class Calibration:
    """Every measurement of a machine, newest per (device class, family) wins."""

    measurements: tuple[Measurement, ...] = field(default_factory=tuple)

    def find(self, device_class: str, family: str) -> Measurement | None:
        found = [m for m in self.measurements
                 if m.device_class == device_class and m.family == family.lower()]
        return found[-1] if found else None

    def with_measurement(self, m: Measurement) -> Calibration:
        kept = [x for x in self.measurements
                if (x.device_class, x.family) != (m.device_class, m.family)]
        return Calibration((*kept, m))

    def to_json(self) -> str:
        return json.dumps(
            {"format": FORMAT, "measurements": [asdict(m) for m in self.measurements]}, indent=2
        )


def plain_dtypes(kind: str, bf16: bool) -> tuple[str, ...]:
    """The dtypes worth measuring on a device kind: fp32 and bf16 on CPU, half on GPUs."""
    if kind == "cpu":
        return PLAIN_DTYPES
    return ("float16", "bfloat16") if bf16 else ("float16",)


def calibration_path(data_dir: Path) -> Path:
    return Path(data_dir).expanduser() / CALIBRATION_FILE


def use_inductor_cache(data_dir: Path) -> Path:
    """Keep torch.compile's (inductor's) on-disk cache beside the data dir, so a compiled
    model's kernels survive a restart: the first job after one compiles in seconds, not
    minutes (sd15-shaped UNet on this CPU: see bench/compile.py). An operator's own
    TORCHINDUCTOR_CACHE_DIR wins. Call before the first compile in the process."""
    import os

    chosen = os.environ.get(INDUCTOR_CACHE_ENV)
    path = Path(chosen) if chosen else Path(data_dir).expanduser() / INDUCTOR_CACHE_DIR
    path.mkdir(parents=True, exist_ok=True)
    os.environ[INDUCTOR_CACHE_ENV] = str(path)
    return path


def load_calibration(path: Path) -> Calibration | None:
    """The calibration stored at ``path``; None when there is none. CalibrationError names the
    file and what is wrong with it when it cannot be used."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"calibration file {path} cannot be read: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        fmt = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise CalibrationError(
            f"calibration file {path} has format {fmt!r}, expected {FORMAT}; "
            "measure again with `atelier devices --measure`"
        )
    try:
        return Calibration(tuple(
            Measurement(**{**m, "variants": tuple(Variant(**v) for v in m["variants"])})
            for m in raw["measurements"]
        ))
    except (KeyError, TypeError) as exc:
        raise CalibrationError(f"calibration file {path} has a bad entry: {exc}") from exc


def save_calibration(calibration: Calibration, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(calibration.to_json())
    tmp.replace(path)


def describe_measurement(m: Measurement) -> str:
    """The figures as a small table, fastest first."""
    lines = [f"measured {m.device_class} / {m.family}: {m.shape} (torch {m.torch_version}, "
             f"{m.measured_at})"]
    runs = sorted(m.variants, key=lambda v: (not v.ok, v.seconds_per_step or 0.0))
    for v in runs:
        if not v.ok:
            lines.append(f"  {v.name:<28} failed: {v.error}")
            continue
        extra = f", compile {v.compile_seconds:.1f} s once" if v.compile_seconds else ""
        mem = f", peak {v.peak_mb:,.0f} MB" if v.peak_mb is not None else ""
        lines.append(f"  {v.name:<28} {v.seconds_per_step:8.3f} s/step{mem}{extra}")
    return "\n".join(lines)


# Applying one variant -----------------------------------------------------------------------


def quantize_module(module: Any, mode: str) -> None:
    """torchao int8 on ``module``'s linear layers: weight-only ("int8") or with dynamically
    quantized int8 activations too ("int8-dynamic"). In place."""
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    if mode == "int8":
        config: Any = Int8WeightOnlyConfig()
    elif mode == "int8-dynamic":
        config = Int8DynamicActivationInt8WeightConfig()
    elif mode == FP8_MODE:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig

        config = Float8DynamicActivationFloat8WeightConfig()
    else:
        raise CalibrationError(
            f"unknown quantization {mode!r}; expected one of {(*QUANT_MODES, FP8_MODE)}"
        )
    quantize_(module, config)


# Measuring ----------------------------------------------------------------------------------


def _peak_reset(device: str) -> Callable[[], float | None]:
    """Reset the peak-memory mark; the returned function reads the peak since, in MB."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return lambda: torch.cuda.max_memory_allocated() / 2**20
    _trim_heap()
    status = Path("/proc/self/status")
    try:  # "5" resets the process's peak RSS (VmHWM) on Linux
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return lambda: None

    def read() -> float | None:
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return None

    return read


def _trim_heap() -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise, and RSS would count the
    previous variant's weights, or the fp32 copy a quantized one was made from)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass


def measure_variant(
    build: Callable[[torch.dtype], Any], inputs: Callable[[torch.dtype], dict[str, Any]],
    variant: Variant, *, device: str = "cpu", steps: int = 3,
) -> Variant:
    """Build the UNet for ``variant``, run ``steps`` timed forward passes after a warm-up (the
    compile, when compiled), and return the variant with its figures (or its error)."""
    import torch

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    dtype = getattr(torch, variant.dtype)
    model = None
    try:
        model = build(dtype).to(device).eval()
        if variant.quantize:
            quantize_module(model, variant.quantize)
        if variant.compile:
            model.compile()
        kwargs = {k: v.to(device) for k, v in inputs(dtype).items()}
        gc.collect()
        # From here: what serving holds (the weights as they run) plus the passes' activations,
        # not the transient copies of building and quantizing.
        peak = _peak_reset(device)
        with torch.inference_mode():
            start = time.perf_counter()
            model(**kwargs)
            sync()
            first = time.perf_counter() - start
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                model(**kwargs)
                sync()
                times.append(time.perf_counter() - start)
        best = min(times)
        compile_s = max(0.0, first - best) if variant.compile else None
        return _with(variant, seconds_per_step=best, peak_mb=peak(), compile_seconds=compile_s)
    except Exception as exc:  # a variant that cannot run here is a finding, not a crash
        log.warning("calibration variant %s failed: %s", variant.name, exc)
        return _with(variant, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    finally:
        del model
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def _with(v: Variant, **changes: Any) -> Variant:
    return Variant(**{**asdict(v), **changes})


def candidate_variants(
    base: str, *, quant: bool, compile: bool, fp8: bool = False
) -> list[Variant]:
    """The variants on top of the fastest plain dtype ``base`` (plain ones are measured first)."""
    out: list[Variant] = []
    if quant:
        out += [Variant(base, q) for q in (*QUANT_MODES, *([FP8_MODE] if fp8 else []))]
    if compile:
        out.append(Variant(base, compile=True))
        if quant:
            out.append(Variant(base, "int8", compile=True))
    return out


def calibrate(
    device_class: str, family: str, shape: str,
    build: Callable[[torch.dtype], Any], inputs: Callable[[torch.dtype], dict[str, Any]],
    *, device: str = "cpu", steps: int = 3, quant: bool = True, compile: bool = True,
    dtypes: Sequence[str] = PLAIN_DTYPES, progress: Callable[[Variant], None] | None = None,
    fp8: bool = False,
) -> Measurement:
    """Measure the plain dtypes, then int8 / int8-dynamic / compiled on the fastest of them."""
    import torch

    done: list[Variant] = []

    def run(v: Variant) -> Variant:
        got = measure_variant(build, inputs, v, device=device, steps=steps)
        done.append(got)
        if progress:
            progress(got)
        return got

    plain = [run(Variant(d)) for d in dtypes]
    ok = [v for v in plain if v.ok]
    base = min(ok, key=lambda v: v.seconds_per_step or 0.0).dtype if ok else dtypes[0]
    for v in candidate_variants(base, quant=quant, compile=compile, fp8=fp8):
        run(v)
    return Measurement(
        device_class=device_class, family=family.lower(), shape=shape,
        measured_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        torch_version=torch.__version__.split("+")[0], variants=tuple(done),
    )


def unet_case(side: int, tiny: bool = False) -> tuple[
    str, Callable[[torch.dtype], Any], Callable[[torch.dtype], dict[str, Any]]
]:
    """What to measure: a description, a UNet builder (random weights, made in the dtype) and
    its inputs (CFG batch 2 at ``side``²): SD1.5's shape (860M parameters), or the tiny one."""
    import torch
    from diffusers import UNet2DConditionModel

    from engine.tiny import SD15_UNET, build_tiny_pipeline

    if tiny:
        unet = build_tiny_pipeline("sd15").unet
        config, context = dict(unet.config), unet.config.cross_attention_dim
        what = f"tiny UNet, CFG x2 at {side}²"
    else:
        config, context = dict(SD15_UNET), 768
        what = f"sd15-shaped UNet (random weights), CFG x2 at {side}²"

    def build(dtype: torch.dtype) -> Any:
        torch.manual_seed(0)
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype if dtype.is_floating_point else old)
        try:  # made in the dtype: no fp32 copy first
            return UNet2DConditionModel.from_config(config).to(dtype)
        finally:
            torch.set_default_dtype(old)

    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, side // 8, side // 8, generator=gen)
    text = torch.randn(2, 77, context, generator=gen)

    def inputs(dtype: torch.dtype) -> dict[str, Any]:
        return {"sample": latents.to(dtype), "timestep": torch.tensor(500),
                "encoder_hidden_states": text.to(dtype)}

    return what, build, inputs


def measure_unet(
    device: str, device_class: str, *, family: str = "sd15", side: int = 256, steps: int = 3,
    tiny: bool = False, quant: bool = True, compile: bool = True,
    dtypes: Sequence[str] = PLAIN_DTYPES, progress: Callable[[Variant], None] | None = None,
    fp8: bool = False,
) -> Measurement:
    """Calibrate with the UNet of ``unet_case``. Only SD1.5 shapes are built here; an
    SDXL-family measurement reuses them (on CPU an SDXL UNet is out of reach)."""
    what, build, inputs = unet_case(side, tiny)
    return calibrate(device_class, family, what, build, inputs, device=device, steps=steps,
                     quant=quant, compile=compile, dtypes=dtypes, progress=progress, fp8=fp8)
