"""Calibration: a profile built from a calibration file picks the fastest measured variant the
model opted into; the file's bad shapes are named. (A real measurement: tests/atelier.)"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict
from pathlib import Path

import pytest

from engine.calibrate import (
    Calibration,
    CalibrationError,
    Measurement,
    Variant,
    calibration_path,
    describe_measurement,
    load_calibration,
    save_calibration,
    use_inductor_cache,
)
from engine.devices import DeviceInfo, choose_profile

CPU = DeviceInfo(
    kind="cpu", name="AMD EPYC", total_memory=32 * 2**30, bf16=True, cpu_bf16=True,
    cpu_flags=("avx2", "avx512f", "avx512_bf16"), mkldnn_bf16=True, cores=2, logical_cpus=4,
    quant_backends=("torchao",),
)


def measurement(**seconds: float) -> Measurement:
    """A cpu/sd15 measurement with these s/step figures, keyed by variant name."""
    variants = []
    for name, s in seconds.items():
        parts = name.split("__")
        variants.append(Variant(
            dtype=parts[0], quantize=next((p.replace("_", "-") for p in parts
                                           if p.startswith("int8")), None),
            compile="compile" in parts, seconds_per_step=s, peak_mb=1000.0,
        ))
    return Measurement("cpu", "sd15", "test UNet", "2026-12-06T21:00:00Z", "2.13.0",
                       tuple(variants))


def write(tmp_path: Path, *ms: Measurement) -> Calibration:
    path = calibration_path(tmp_path)
    save_calibration(Calibration(ms), path)
    loaded = load_calibration(path)
    assert loaded is not None
    return loaded


def test_profile_picks_the_fastest_measured_variant(tmp_path: Path) -> None:
    cal = write(tmp_path, measurement(
        float32=2.0, bfloat16=1.0, bfloat16__int8=0.8, bfloat16__int8_dynamic=0.9,
        bfloat16__compile=0.7,
    ))
    p = choose_profile(CPU, "sd15", quantize="int8", compile=True, calibration=cal)
    assert (p.dtype, p.quantize, p.compile) == ("bfloat16", None, True)
    assert any(r.startswith("compile on: measured fastest (bfloat16+compile 0.700 s/step")
               for r in p.reasons)
    assert any(r.startswith("quantize off (model opt-in): measured slower") for r in p.reasons)
    # Without the compile opt-in the compiled figure is out of reach: int8 is next.
    p = choose_profile(CPU, "sd15", quantize="int8", calibration=cal)
    assert (p.dtype, p.quantize, p.quantize_backend, p.compile) == (
        "bfloat16", "int8", "torchao", False)
    # Without any opt-in only the plain dtypes count.
    p = choose_profile(CPU, "sd15", calibration=cal)
    assert (p.dtype, p.quantize, p.compile) == ("bfloat16", None, False)
    assert p.reasons[0].startswith("dtype bfloat16: fastest measured (bfloat16 1.000 s/step")


def test_measured_float32_beats_the_bf16_assumption(tmp_path: Path) -> None:
    # A CPU that emulates bf16: the measurement, not the flag, decides.
    cal = write(tmp_path, measurement(float32=1.0, bfloat16=3.0, float32__int8_dynamic=0.6))
    p = choose_profile(CPU, "sd15", quantize="int8", calibration=cal)
    assert (p.dtype, p.quantize) == ("float32", "int8-dynamic")
    # Another family or device class was not measured: the rules apply.
    assert choose_profile(CPU, "sdxl", quantize="int8", calibration=cal).dtype == "bfloat16"


def test_failed_variants_are_never_chosen(tmp_path: Path) -> None:
    m = measurement(float32=2.0, bfloat16=1.0)
    m = Measurement(**{**asdict(m), "variants": (
        *m.variants, Variant("bfloat16", compile=True, error="InductorError: no compiler"))})
    cal = write(tmp_path, m)
    p = choose_profile(CPU, "sd15", compile=True, calibration=cal)
    assert p.compile is False
    assert any("failed here: bfloat16+compile" in r for r in p.reasons)
    assert "failed: InductorError: no compiler" in describe_measurement(m)


def test_cpu_compile_needs_a_measurement() -> None:
    p = choose_profile(CPU, "sd15", compile=True)
    assert p.compile is False
    assert any("compile skipped: not measured on cpu" in r for r in p.reasons)


def test_bad_calibration_files_are_named(tmp_path: Path) -> None:
    path = tmp_path / "calibration.json"
    assert load_calibration(path) is None  # none yet
    path.write_text("{not json")
    with pytest.raises(CalibrationError, match="calibration.json cannot be read"):
        load_calibration(path)
    path.write_text(json.dumps({"format": 99, "measurements": []}))
    with pytest.raises(CalibrationError, match="has format 99, expected 1"):
        load_calibration(path)
    path.write_text(json.dumps({"format": 1, "measurements": [{"family": "sd15"}]}))
    with pytest.raises(CalibrationError, match="bad entry"):
        load_calibration(path)


def test_a_new_measurement_replaces_the_old_one(tmp_path: Path) -> None:
    cal = Calibration((measurement(float32=1.0),)).with_measurement(measurement(bfloat16=0.5))
    found = cal.find("cpu", "sd15")
    assert found is not None and [v.name for v in found.variants] == ["bfloat16"]


def test_compiled_kernels_are_kept_beside_the_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inductor's cache goes beside calibration.json (a restart then compiles in seconds, see
    bench/compile.py); an operator's own TORCHINDUCTOR_CACHE_DIR is left as it is."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    data = tmp_path / "data"
    got = use_inductor_cache(data)
    assert got == data / "inductor-cache" and got.is_dir()
    assert got.parent == calibration_path(data).parent
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(got)

    own = tmp_path / "operators-cache"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(own))
    assert use_inductor_cache(data) == own and own.is_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(own)


H100 = DeviceInfo(
    kind="cuda", name="NVIDIA H100 80GB HBM3", index=0, capability=(9, 0),
    total_memory=80 * 2**30, bf16=True, quant_backends=("torchao",),
)
A100 = dataclasses.replace(H100, name="NVIDIA A100-SXM4-40GB", capability=(8, 0),
                           total_memory=40 * 2**30)


def test_fp8_is_an_opt_in_only_where_the_gpu_has_it(tmp_path: Path) -> None:
    # A CPU or a pre-Ada GPU: skipped, saying what it needs and what this device is.
    for info, what in ((CPU, "cpu (AMD EPYC)"), (A100, "NVIDIA A100-SXM4-40GB (sm80)")):
        p = choose_profile(info, "sd15", quantize="fp8")
        assert p.quantize is None and p.quantize_backend is None
        assert f"quantize fp8 skipped: needs an NVIDIA GPU of sm89 or newer (Ada, Hopper); " \
               f"this is {what}" in p.reasons
    # Hopper, not measured: the opt-in applies.
    p = choose_profile(H100, "sd15", quantize="fp8")
    assert (p.quantize, p.quantize_backend) == ("fp8", "torchao")
    # Measured: fp8 only when it was the fastest, and an int8 opt-in never picks fp8.
    m = Measurement(p.device_class, "sd15", "test UNet", "2026-12-07T03:00:00Z", "2.13.0", (
        Variant("bfloat16", seconds_per_step=0.10, peak_mb=3000.0),
        Variant("bfloat16", "int8", seconds_per_step=0.12, peak_mb=2500.0),
        Variant("bfloat16", "fp8", seconds_per_step=0.07, peak_mb=2200.0),
    ))
    cal = write(tmp_path, m)
    assert choose_profile(H100, "sd15", quantize="fp8", calibration=cal).quantize == "fp8"
    assert choose_profile(H100, "sd15", quantize="int8", calibration=cal).quantize is None
