"""LoRAs and embeddings loaded into a worker's pipelines: each LoRA is read from disk once and
kept, least recently used first out, beside the model it was loaded into; a batch then only
switches which are active and at what weights (Diffusers/PEFT ``set_adapters``), which costs
milliseconds. An embedding is loaded the first time its token is in a prompt, and kept."""

from __future__ import annotations

import logging
import re
import threading
import time
import warnings
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster.adapters import AdapterSpec, unknown_adapter
from cluster.availability import hub_offline
from core.adapters import AdapterRef
from core.errors import ModelUnavailable

if TYPE_CHECKING:
    from engine.pipelines import Pipeline as DiffusionPipeline

log = logging.getLogger(__name__)

def peft_name(name: str) -> str:
    """The PEFT adapter name for a registry name: PEFT keys modules by it, and '.' splits keys."""
    return "lora_" + re.sub(r"[^a-z0-9_]", "_", name)


class AdapterCache:
    """Per worker: which LoRAs each loaded UNet holds (LRU, ``capacity`` per model: the device
    profile's ``lora_slots``), and ``apply`` per batch.

    Keyed by the UNet, which a model's txt2img/img2img/inpaint pipelines share: a LoRA loaded
    through one sibling is there for all, and a model evicted from the cache takes its LoRAs.
    """

    def __init__(
        self, adapters: dict[str, AdapterSpec], *, capacity: int, offline: bool | None = None
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.adapters = adapters
        self.capacity = capacity
        self._offline = offline
        self._held: weakref.WeakKeyDictionary[Any, OrderedDict[str, None]] = (
            weakref.WeakKeyDictionary()
        )
        self._embedded: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self.loads = 0
        self.hits = 0
        self.evictions = 0
        self.load_times: list[tuple[str, float]] = []

    def loaded(self, pipe: DiffusionPipeline) -> list[str]:
        """Registry names of the LoRAs loaded into ``pipe``'s UNet, least recently used first."""
        with self._lock:
            return list(self._held.get(pipe.unet, {}))

    def apply(self, pipe: DiffusionPipeline, refs: tuple[AdapterRef, ...]) -> None:
        """Make exactly ``refs`` active on ``pipe`` at their weights (none: LoRAs off)."""
        with self._lock:
            held = self._held.setdefault(pipe.unet, OrderedDict())
            if not refs:
                if held:
                    pipe.disable_lora()
                return
            for ref in refs:
                self._ensure(pipe, held, ref.name, keep={r.name for r in refs})
            weights = [
                self.adapters[r.name].default_weight if r.weight is None else r.weight
                for r in refs
            ]
            pipe.enable_lora()
            pipe.set_adapters([peft_name(r.name) for r in refs], adapter_weights=weights)

    def embed(
        self, pipe: DiffusionPipeline, family: str, texts: list[str], model: str | None = None
    ) -> list[str]:
        """Load every embedding for ``family`` (and model ``model``, where an embedding names
        its models) whose token appears in ``texts`` (prompts and negatives) into ``pipe``'s
        text encoder, once; the names of those now in use. An embedding is a few new token
        vectors, kept for the life of the model."""
        with self._lock:
            held = self._embedded.setdefault(pipe.text_encoder, set())
            used = []
            for spec in self.adapters.values():
                if spec.kind != "embedding" or not spec.fits(family, model):
                    continue
                token = re.compile(rf"(?<![\w-]){re.escape(spec.prompt_token)}(?![\w-])")
                if not any(token.search(t) for t in texts):
                    continue
                if spec.name not in held:
                    began = time.monotonic()
                    _load_embedding(pipe, spec)
                    self.loads += 1
                    self.load_times.append((spec.name, time.monotonic() - began))
                    held.add(spec.name)
                used.append(spec.name)
            return used

    def unload(self, pipe: DiffusionPipeline, name: str) -> bool:
        """Remove LoRA ``name`` from ``pipe``; False if it was not loaded."""
        with self._lock:
            held = self._held.get(pipe.unet)
            if held is None or name not in held:
                return False
            self._evict(pipe, held, name)
            return True

    def _ensure(
        self, pipe: DiffusionPipeline, held: OrderedDict[str, None], name: str, keep: set[str]
    ) -> None:
        if name in held:
            self.hits += 1
            held.move_to_end(name)
            return
        spec = self.adapters.get(name)
        if spec is None or spec.kind != "lora":
            raise unknown_adapter(name, [a.name for a in self.adapters.values()])
        while len(held) >= self.capacity:
            victim = next((n for n in held if n not in keep), None)
            if victim is None:
                break
            self._evict(pipe, held, victim)
        began = time.monotonic()
        _load(pipe, spec, self._offline)
        self.loads += 1
        self.load_times.append((name, time.monotonic() - began))
        held[name] = None

    def _evict(self, pipe: DiffusionPipeline, held: OrderedDict[str, None], name: str) -> None:
        log.info("unloading LoRA %r", name)
        with warnings.catch_warnings():
            # PEFT warns when the active adapter goes; every batch sets its own (``apply``).
            warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
            pipe.delete_adapters([peft_name(name)])
        del held[name]
        self.evictions += 1


def _missing(spec: AdapterSpec) -> ModelUnavailable:
    kind = "LoRA" if spec.kind == "lora" else "embedding"
    return ModelUnavailable(
        f"{kind} '{spec.name}' is not available: its file does not exist. "
        f"To get it: {spec.how_to_get()}", detail=f"file {spec.file} does not exist",
    )


def _load_embedding(pipe: DiffusionPipeline, spec: AdapterSpec) -> None:
    """Add embedding ``spec`` (a local file) as its token; ModelUnavailable on failure."""
    if spec.source != "file" or not Path(spec.file).is_file():
        raise _missing(spec)
    try:
        pipe.load_textual_inversion(spec.file, token=spec.prompt_token)
    except Exception as exc:  # any library error becomes one clear message
        raise ModelUnavailable(
            f"embedding '{spec.name}' could not be loaded: its file is not a {spec.family} "
            f"embedding that Diffusers can read. To get a good copy: {spec.how_to_get()}",
            detail=f"embedding {spec.name!r} ({spec.location}): {exc}",
        ) from exc


def _load(pipe: DiffusionPipeline, spec: AdapterSpec, offline: bool | None) -> None:
    """Read ``spec`` into ``pipe``; ModelUnavailable naming it and how to get it on failure."""
    kwargs: dict[str, Any]
    if spec.source == "file":
        path = Path(spec.file)
        if not path.is_file():
            raise _missing(spec)
        where, kwargs = str(path.parent), {"weight_name": path.name}
    else:
        where = str(spec.repo)
        offline = hub_offline() if offline is None else offline
        kwargs = {"weight_name": spec.file, "local_files_only": offline}
    log.info("loading LoRA %r (%s %s)", spec.name, spec.source, spec.location)
    try:
        with warnings.catch_warnings():
            # PEFT warns on every adapter after the first; several per model is the point here.
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            pipe.load_lora_weights(where, adapter_name=peft_name(spec.name), **kwargs)
    except Exception as exc:  # any library error becomes one clear message
        raise ModelUnavailable(
            f"LoRA '{spec.name}' could not be loaded: its file is not a {spec.family} LoRA "
            f"that Diffusers can read. To get a good copy: {spec.how_to_get()}",
            detail=f"LoRA {spec.name!r} ({spec.location}): {exc}",
        ) from exc
