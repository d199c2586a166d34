"""Whether each registry model can be loaded here, and how to get the ones that cannot: a local
folder that looks like a Diffusers pipeline, a single checkpoint file, a repo in the Hugging Face
cache, or a repo that can be downloaded (the hub answers here). Cheap file checks; the only
network call is the hub probe of ``cluster.hub`` (bounded, its answer kept for minutes)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from cluster import registry as _registry
from cluster.adapters import AdapterSpec
from cluster.hub import UNREACHABLE, hub_reachable
from cluster.hub import hub_offline as hub_offline
from cluster.registry import ModelRegistry, ModelSpec, how_to_get


class Availability(StrEnum):
    folder = "folder"  # a local Diffusers folder with its model_index.json and components
    file = "file"  # a local single-file checkpoint
    cached = "cached"  # a hub repo already in the local Hugging Face cache
    downloadable = "downloadable"  # a hub repo not cached, but the hub can be reached
    missing = "missing"  # none of the above: a load would fail, whatever the retries

    @property
    def loadable(self) -> bool:
        return self is not Availability.missing


@dataclass(frozen=True, slots=True)
class ModelAvailability:
    """One model's state here. ``why`` and ``how`` (one line each, no server paths: they may
    reach a person in a chat) are set only for a missing model."""

    name: str
    status: Availability
    why: str | None = None
    how: str | None = None

    @property
    def loadable(self) -> bool:
        return self.status.loadable

    def line(self) -> str:
        """One line for `atelier up` and refusals."""
        if self.loadable:
            return f"{self.name}: available ({self.status.value})"
        return f"{self.name}: not available ({self.why}); {self.how}"


def _folder_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a loadable Diffusers pipeline folder, or None when it looks like
    one: its model_index.json parses and every component it names has its folder."""
    if not folder.is_dir():
        return "its folder does not exist"
    index = folder / "model_index.json"
    if not index.is_file():
        return "its folder has no model_index.json, so it is not a Diffusers pipeline"
    try:
        doc: Any = json.loads(index.read_text("utf-8"))
    except (OSError, ValueError):
        return "its model_index.json is not valid JSON"
    if not isinstance(doc, dict):
        return "its model_index.json is not a pipeline index"
    for component, value in doc.items():
        # Components are ["library", "Class"]; [null, null] (e.g. no safety checker) is absent.
        if component.startswith("_") or not isinstance(value, list) or None in value:
            continue
        if not (folder / component).is_dir():
            return f"its folder lacks the {component!r} component"
    return None


def model_availability(spec: ModelSpec, *, offline: bool | None = None) -> ModelAvailability:
    """Whether ``spec`` can be loaded on this machine (``offline`` defaults to HF_HUB_OFFLINE)."""
    if spec.source == "path":
        problem = _folder_problem(Path(str(spec.path)))
        if problem is None:
            return ModelAvailability(spec.name, Availability.folder)
        return ModelAvailability(spec.name, Availability.missing, problem, how_to_get(spec))
    if spec.source == "file":
        if Path(str(spec.file)).is_file():
            return ModelAvailability(spec.name, Availability.file)
        return ModelAvailability(spec.name, Availability.missing, "its checkpoint file does "
                                 "not exist", how_to_get(spec))
    if _registry.hub_cached(str(spec.repo)):
        return ModelAvailability(spec.name, Availability.cached)
    if hub_offline() if offline is None else offline:
        return ModelAvailability(
            spec.name, Availability.missing,
            "it is not in the Hugging Face cache and the hub is offline (HF_HUB_OFFLINE)",
            how_to_get(spec),
        )
    if not hub_reachable():
        return ModelAvailability(spec.name, Availability.missing, UNREACHABLE, how_to_get(spec))
    return ModelAvailability(spec.name, Availability.downloadable)


def registry_availability(
    registry: ModelRegistry, *, offline: bool | None = None
) -> dict[str, ModelAvailability]:
    """Every model of ``registry``, by name, in registry order."""
    return {s.name: model_availability(s, offline=offline) for s in registry}


def loadable_models(registry: ModelRegistry, *, offline: bool | None = None) -> list[str]:
    """The names of the models that can be loaded here (what a worker publishes)."""
    return [n for n, a in registry_availability(registry, offline=offline).items() if a.loadable]


def registry_table_rows(
    registry: ModelRegistry, *, offline: bool | None = None
) -> list[dict[str, Any]]:
    """One row per model for ``atelier models list``."""
    here = registry_availability(registry, offline=offline)
    return [
        {
            "name": s.name,
            "default": s.name == registry.default,
            "family": s.family.value,
            "source": f"{s.source}:{s.location}",
            "min_vram_gb": s.min_vram_gb,
            "default_size": f"{s.default_width}x{s.default_height}",
            "max_size": f"{s.max_width}x{s.max_height}",
            "default_steps": s.default_steps,
            "scheduler": s.scheduler,
            "available": here[s.name].loadable,
            "availability": here[s.name].status.value,
            "how": here[s.name].how,
            "description": s.description,
        }
        for s in registry
    ]


def adapter_availability(spec: AdapterSpec, *, offline: bool | None = None) -> ModelAvailability:
    """Whether adapter ``spec`` can be loaded here: its file, or its file in a cached hub repo."""
    if spec.repo is None:
        if Path(spec.file).is_file() or (
            spec.kind == "controlnet" and (Path(spec.file) / "config.json").is_file()
        ):
            return ModelAvailability(spec.name, Availability.file)
        return ModelAvailability(spec.name, Availability.missing, "its file does not exist",
                                 spec.how_to_get())
    in_repo = "config.json" if spec.kind == "controlnet" and spec.file == "." else spec.file
    if _registry.hub_cached(spec.repo, in_repo):
        return ModelAvailability(spec.name, Availability.cached)
    if not (hub_offline() if offline is None else offline):
        return ModelAvailability(spec.name, Availability.downloadable)
    return ModelAvailability(
        spec.name, Availability.missing,
        "it is not in the Hugging Face cache and the hub is offline (HF_HUB_OFFLINE)",
        spec.how_to_get(),
    )


def adapter_table_rows(
    registry: ModelRegistry, *, offline: bool | None = None
) -> list[dict[str, Any]]:
    """One row per LoRA or embedding for ``atelier models list``."""
    rows = []
    for a in registry.adapters.values():
        here = adapter_availability(a, offline=offline)
        rows.append({
            "name": a.name, "kind": a.kind, "family": a.family, "models": ", ".join(a.models),
            "source": f"{a.source}:{a.location}", "default_weight": a.default_weight,
            "triggers": ", ".join(a.triggers), "available": here.loadable,
            "availability": here.status.value, "how": here.how, "description": a.description,
        })
    return rows
