"""``atelier devices --measure``: calibrate this machine's first device and store the figures."""

from __future__ import annotations

from pathlib import Path

from atelier.wiring import console, quiet_ml_libraries
from engine.calibrate import (
    Calibration,
    Variant,
    measure_unet,
    plain_dtypes,
    save_calibration,
    use_inductor_cache,
)
from engine.devices import best_device, choose_profile, has_fp8


def measure_first_device(
    path: Path, calibration: Calibration | None, family: str, side: int, tiny: bool,
    *, compile: bool = True,
) -> Calibration:
    """Measure every variant on the first device, print each as it lands, save, return."""
    import torch

    quiet_ml_libraries()
    use_inductor_cache(path.parent)  # what is compiled here, the worker finds compiled
    info = best_device()
    profile = choose_profile(info, family)
    if profile.threads:
        torch.set_num_threads(profile.threads)
    console.print(f"measuring {profile.device_class} ({profile.device_name}), {family}: "
                  f"{'tiny' if tiny else 'SD1.5-shaped'} UNet at {side}²")

    def show(v: Variant) -> None:
        if v.ok:
            console.print(f"  {v.name:<28} {v.seconds_per_step:.3f} s/step", markup=False)
        else:
            console.print(f"  {v.name:<28} failed: {v.error}", markup=False)

    measured = measure_unet(
        profile.device, profile.device_class, family=family, side=side, tiny=tiny,
        quant="torchao" in info.quant_backends, dtypes=plain_dtypes(info.kind, info.bf16),
        compile=compile, steps=1 if tiny else 3, progress=show, fp8=has_fp8(info),
    )
    updated = (calibration or Calibration()).with_measurement(measured)
    save_calibration(updated, path)
    console.print(f"saved {path}\n")
    return updated
