"""Loaded pipelines kept per worker: least recently used models are evicted to stay under a
memory budget; img2img/inpaint siblings share their base model's weights."""

from __future__ import annotations

import gc
import json
import logging
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster.registry import ModelRegistry, ModelSpec
from core.request import JobKind
from engine.calibrate import Calibration
from engine.devices import DeviceInfo, DeviceProfile, apply_profile, choose_profile
from engine.loading import derive_pipeline, load_pipeline

if TYPE_CHECKING:
    from engine.pipelines import Pipeline as DiffusionPipeline

log = logging.getLogger(__name__)

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# Which pipeline serves each job kind; "variation" and "upscale" are img2img on a given image.
ROLE_OF_KIND = {
    JobKind.txt2img: "txt2img",
    JobKind.img2img: "img2img",
    JobKind.variation: "img2img",
    JobKind.upscale: "img2img",
    JobKind.inpaint: "inpaint",
}
Loader = Callable[..., "DiffusionPipeline"]


def pipeline_bytes(pipe: DiffusionPipeline) -> int:
    """Bytes held by the pipeline's parameters and buffers (shared tensors counted once)."""
    import torch

    seen: set[int] = set()
    total = 0
    for component in pipe.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        for t in (*component.parameters(), *component.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def _safetensors_params(path: Path) -> int:
    """Parameter count from a .safetensors header (8-byte length, then JSON): no tensor read."""
    with path.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        # A corrupt file's length may be anything (petabytes): never read past its end.
        if length > path.stat().st_size - 8:
            raise ValueError(f"{path} is not a safetensors file (header length {length})")
        header = json.loads(fh.read(length))
    return sum(prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


def _folder_params(folder: Path, variant: str | None) -> int | None:
    """Parameters in a Diffusers folder, counting one weights variant per component."""
    total = 0
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(sub.glob("*.safetensors"))
        chosen = [f for f in files if variant and f".{variant}." in f.name]
        # Plain weights have no variant infix: "model.safetensors", "x-00001-of-00002...".
        chosen = chosen or [f for f in files if f.name.count(".") == 1]
        for f in chosen:
            total += _safetensors_params(f)
    return total or None


def estimate_params(spec: ModelSpec) -> int:
    """Parameters of ``spec`` before loading it: from its weight files when they are local,
    else the published count for its family."""
    try:
        if spec.path is not None and spec.path.is_dir():
            return _folder_params(spec.path, spec.variant) or spec.estimated_params
        if spec.file is not None and spec.file.suffix == ".safetensors" and spec.file.is_file():
            return _safetensors_params(spec.file)
        if spec.repo is not None:
            from huggingface_hub import try_to_load_from_cache

            index = try_to_load_from_cache(spec.repo, "model_index.json")
            if isinstance(index, str):
                return _folder_params(Path(index).parent, spec.variant) or spec.estimated_params
    except (OSError, ValueError, KeyError, struct.error):
        pass  # an unreadable file fails properly at load time; here a guess is enough
    return spec.estimated_params


def default_budget_bytes(info: DeviceInfo, fraction: float | None = None) -> int:
    """How much memory loaded weights may take: the rest is for activations (and, on CPU and
    MPS, everything else the host runs)."""
    share = fraction if fraction is not None else (0.5 if info.kind in ("cpu", "mps") else 0.7)
    return int((info.total_memory or 8 * 2**30) * share)


@dataclass
class _Entry:
    spec: ModelSpec
    pipelines: dict[str, DiffusionPipeline]  # role -> pipeline; "txt2img" owns the weights
    size_bytes: int
    profile: DeviceProfile


class ModelCache:
    """LRU of loaded models for one device. ``get`` loads on a miss; ``loads`` counts loads.

    With ``device_info`` each model gets its own profile (offload thresholds depend on the
    family; compile/quantize/fast are per-model opt-ins); without it ``profile`` serves all.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        profile: DeviceProfile,
        budget_bytes: int,
        *,
        device_info: DeviceInfo | None = None,
        loader: Loader = load_pipeline,
        offline: bool | None = None,
        calibration: Calibration | None = None,
    ) -> None:
        self.registry = registry
        self.calibration = calibration  # measured variants choose dtype/quantize/compile
        self.profile = profile
        self.budget_bytes = budget_bytes
        self._info = device_info
        self._loader = loader
        self._offline = offline
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._last_loaded: list[str] = []  # what loaded() saw last
        self._sizes: dict[str, int] = {}  # measured sizes, remembered across evictions
        # One lock: two jobs must never load the same model twice or evict one in use.
        self._lock = threading.RLock()
        self.loads = 0
        self.hits = 0
        self.evictions = 0
        # (model, seconds) of each load since the worker last reported them (take_load_times).
        self.load_times: list[tuple[str, float]] = []

    # Queries -----------------------------------------------------------------------------

    def loaded(self) -> list[str]:
        """Names of loaded models, least recently used first. Never waits: while a load (a
        download, maybe minutes) holds the lock, the names as last seen (the worker's info()
        must answer meanwhile, or its dispatcher takes it for dead)."""
        if self._lock.acquire(blocking=False):
            try:
                self._last_loaded = list(self._entries)
            finally:
                self._lock.release()
        return list(self._last_loaded)

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(e.size_bytes for e in self._entries.values())

    def size_of(self, name: str) -> int:
        """Bytes a model takes (measured once loaded; estimated before)."""
        spec = self.registry.get(name)
        if spec.name in self._sizes:
            return self._sizes[spec.name]
        return estimate_params(spec) * DTYPE_BYTES[self.profile_of(spec.name).dtype]

    def profile_of(self, name: str | None) -> DeviceProfile:
        """The profile model ``name`` runs (or would run) with."""
        spec = self.registry.get(name)
        if self._info is None:
            return self.profile
        return choose_profile(
            self._info, spec.family.value, compile=spec.compile, quantize=spec.quantize,
            fast=spec.fast, calibration=self.calibration,
        )

    # Use ---------------------------------------------------------------------------------

    def get(self, name: str | None, kind: JobKind = JobKind.txt2img) -> DiffusionPipeline:
        """The pipeline for ``kind`` of model ``name`` (None: the registry default).

        Raises InvalidRequest for an unknown name and ModelLoadError when loading fails.
        """
        spec = self.registry.get(name)
        role = ROLE_OF_KIND[kind]
        with self._lock:
            entry = self._entries.get(spec.name)
            if entry is None:
                entry = self._load(spec)
            else:
                self.hits += 1
                self._entries.move_to_end(spec.name)
            pipe = entry.pipelines.get(role)
            if pipe is None:
                pipe = derive_pipeline(entry.pipelines["txt2img"], kind)
                entry.pipelines[role] = pipe
            return pipe

    def take_load_times(self) -> list[tuple[str, float]]:
        """The loads since the last call, (model, seconds) each, and forget them."""
        with self._lock:
            taken, self.load_times = self.load_times, []
            return taken

    def evict(self, name: str) -> bool:
        """Unload ``name`` now; False if it was not loaded."""
        with self._lock:
            entry = self._entries.pop(name, None)
            if entry is None:
                return False
            self._release(entry)
            return True

    def clear(self) -> None:
        with self._lock:
            for name in list(self._entries):
                self.evict(name)

    # Internals ---------------------------------------------------------------------------

    def _load(self, spec: ModelSpec) -> _Entry:
        self._make_room(self.size_of(spec.name))
        profile = self.profile_of(spec.name)
        log.info("loading model %r (%s %s)", spec.name, spec.source, spec.location)
        began = time.monotonic()
        # Loaded straight in the target dtype: no fp32 copy in memory first.
        pipe = self._loader(spec, torch_dtype=profile.torch_dtype, offline=self._offline)
        self.loads += 1
        apply_profile(pipe, profile)
        self.load_times.append((spec.name, time.monotonic() - began))
        size = pipeline_bytes(pipe)
        self._sizes[spec.name] = size
        entry = _Entry(spec=spec, pipelines={"txt2img": pipe}, size_bytes=size, profile=profile)
        self._entries[spec.name] = entry
        # The estimate may have been low: trim others now that the real size is known.
        self._make_room(0, keep=spec.name)
        if size > self.budget_bytes:
            log.warning(
                "model %r takes %.2f GB, more than the cache budget of %.2f GB; kept alone",
                spec.name, size / 1e9, self.budget_bytes / 1e9,
            )
        return entry

    def _make_room(self, needed: int, keep: str | None = None) -> None:
        while self._entries and self.used_bytes + needed > self.budget_bytes:
            victim = next((n for n in self._entries if n != keep), None)
            if victim is None:
                return
            log.info("evicting model %r (least recently used) to stay in budget", victim)
            self._release(self._entries.pop(victim))

    def _release(self, entry: _Entry) -> None:
        self.evictions += 1
        entry.pipelines.clear()
        # Drop the weights now rather than at some later collection: the next load needs room.
        gc.collect()
        if entry.profile.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


def describe_cache(cache: ModelCache) -> dict[str, Any]:
    """A snapshot for logs and the worker's status: loaded models, sizes and counters."""
    return {
        "loaded": cache.loaded(),
        "used_bytes": cache.used_bytes,
        "budget_bytes": cache.budget_bytes,
        "loads": cache.loads,
        "hits": cache.hits,
        "evictions": cache.evictions,
    }
