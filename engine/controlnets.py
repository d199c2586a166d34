"""ControlNets on a worker: each loaded once (a Diffusers folder, or a hub repo) in the model's
dtype and device, kept least recently used first out, up to what the device keeps; and the
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

# How many ControlNets a worker keeps loaded, by device kind: one is a third of an SD1.5 UNet.
DEFAULT_KEPT = {"cpu": 2, "mps": 2}
GPU_KEPT = 4


def kept_for(device: str) -> int:
    """The ControlNets a device of this kind keeps loaded ("cuda:0" -> its kind "cuda")."""
    return DEFAULT_KEPT.get(device.split(":")[0], GPU_KEPT)


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
