"""ControlNets on a worker: each loaded once (a Diffusers folder, or a hub repo) in the model's
dtype and device, kept least recently used first out, up to what the device profile keeps
(``kept_for``, decided in ``engine.devices.choose_profile``); and the
ControlNet view of a loaded model's pipeline (``from_pipe``: the model's weights shared)."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster.adapters import AdapterSpec, unknown_adapter
from core.errors import ModelUnavailable
from core.request import JobKind

if TYPE_CHECKING:
    import torch

    from engine.pipelines import Pipeline as DiffusionPipeline

log = logging.getLogger(__name__)

# What one ControlNet weighs in half precision (a copy of the UNet's encoder half, ~361M
# weights for SD1.5, ~1.25B for SDXL), and what the model itself needs beside it.
CONTROLNET_GB = {False: 0.75, True: 2.5}  # by "is SDXL-class"
MODEL_GB = {False: 6.0, True: 10.0}
MAX_KEPT = 8


def kept_for(
    kind: str, memory_gb: float | None, *, xl: bool, half: bool, offload: str
) -> tuple[int, str]:
    """How many ControlNets a device keeps loaded, and why (one line, for the profile): a
    quarter of the memory the model leaves free, at what one weighs in the device's dtype;
    one where the model is offloaded (memory is what it lacks) or the memory is unknown."""
    what = "SDXL-class" if xl else "SD1.5-class"
    if offload != "none":
        return 1, f"controlnets kept 1: offload {offload}, no memory to keep more"
    if not memory_gb:
        return 1, f"controlnets kept 1: the {kind} device's memory is unknown"
    size = CONTROLNET_GB[xl] * (1 if half else 2)
    free = max(memory_gb - MODEL_GB[xl] * (1 if half else 2), 0.0)
    kept = max(1, min(MAX_KEPT, int(free * 0.25 / size)))
    where = "GB of RAM" if kind in ("cpu", "mps") else "GB of VRAM"
    return kept, (
        f"controlnets kept {kept}: a quarter of the {free:.0f} {where} left beside an {what} "
        f"model, at ~{size:g} GB each in {'half' if half else 'full'} precision"
        f"{f' (at most {MAX_KEPT})' if kept == MAX_KEPT else ''}"
    )


class ControlNetCache:
    """Per worker: loaded ControlNet models by catalogue name (LRU)."""

    def __init__(self, adapters: dict[str, AdapterSpec], *, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.adapters = adapters
        self.capacity = capacity
        self._loaded: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0

    def get(self, name: str, *, dtype: torch.dtype, device: str) -> Any:
        """The ControlNet ``name`` on ``device``; ModelUnavailable when its files are not here."""
        spec = self.adapters.get(name)
        if spec is None or spec.kind != "controlnet":
            known = [a.name for a in self.adapters.values() if a.kind == "controlnet"]
            raise unknown_adapter(name, known, "ControlNet")
        with self._lock:
            model = self._loaded.get(name)
            if model is not None:
                self._loaded.move_to_end(name)
                return model
            model = _load(spec, dtype).to(device)
            self.loads += 1
            self._loaded[name] = model
            while len(self._loaded) > self.capacity:
                gone, _ = self._loaded.popitem(last=False)
                log.info("ControlNet %r unloaded (least recently used)", gone)
            return model

    def loaded(self) -> set[str]:
        """The names of the ControlNets loaded now."""
        with self._lock:
            return set(self._loaded)


def _load(spec: AdapterSpec, dtype: torch.dtype) -> Any:
    from diffusers import ControlNetModel

    where: str = spec.file if spec.repo is None else spec.repo
    if spec.repo is None and not (Path(spec.file) / "config.json").is_file():
        raise ModelUnavailable(
            f"ControlNet '{spec.name}' is not available: its folder does not exist. "
            f"To get it: {spec.how_to_get()}",
            detail=f"ControlNet {spec.name!r}: no config.json under {spec.file}",
            model=spec.name,
        )
    log.info("loading ControlNet %r from %s", spec.name, where)
    subfolder = None if spec.repo is None or spec.file in (".", "") else spec.file
    return ControlNetModel.from_pretrained(where, subfolder=subfolder, torch_dtype=dtype)


def control_pipeline(base: DiffusionPipeline, kind: JobKind, controlnet: Any) -> DiffusionPipeline:
    """The ControlNet pipeline of ``kind`` over a loaded text-to-image pipeline's components."""
    import diffusers

    if kind is JobKind.txt2img:
        auto: Any = diffusers.AutoPipelineForText2Image
    elif kind is JobKind.img2img:
        auto = diffusers.AutoPipelineForImage2Image
    else:
        auto = diffusers.AutoPipelineForInpainting
    pipe = auto.from_pipe(base, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe
