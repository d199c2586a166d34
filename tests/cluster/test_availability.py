"""Availability of registry models here: a Diffusers folder (checked to look like a pipeline), a
single file, the Hugging Face cache (its own cache API, offline), downloadable when online, and a
one-line "how to get it" for each missing one, with no server path in it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from cluster.availability import (
    Availability,
    loadable_models,
    model_availability,
    registry_availability,
)
from cluster.hub import forget_probes
from cluster.registry import ModelSpec
from testing.hub import FakeHub

if TYPE_CHECKING:
    from tests.cluster.conftest import TinyModels


def spec(**fields: object) -> ModelSpec:
    base: dict[str, object] = {
        "name": "m", "family": "sd15", "min_vram_gb": 0, "default_width": 64,
        "default_height": 64, "max_width": 512, "max_height": 512, "default_steps": 4,
        "max_steps": 50, "scheduler": "Euler", "guidance": 7.0,
    }
    return ModelSpec(**(base | fields))  # type: ignore[arg-type]


def test_a_built_tiny_folder_is_available(tiny_models: TinyModels) -> None:
    here = registry_availability(tiny_models.registry, offline=True)
    assert here["tiny"].status is Availability.folder and here["tiny"].how is None
    assert here["tiny-xl"].loadable
    assert {"tiny", "tiny-xl"} <= set(loadable_models(tiny_models.registry, offline=True))


def test_a_missing_folder_says_how_to_get_it(tmp_path: Path) -> None:
    a = model_availability(
        spec(path=tmp_path / "nope", hint="build it with `atelier models make-tiny`"))
    assert a.status is Availability.missing and not a.loadable
    assert a.why == "its folder does not exist"
    assert a.how is not None and a.how.startswith("build it with `atelier models make-tiny`, or ")
    assert str(tmp_path) not in a.line()


def test_a_folder_must_look_like_a_pipeline(tiny_models: TinyModels, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    assert model_availability(spec(path=bare)).why == (
        "its folder has no model_index.json, so it is not a Diffusers pipeline")
    # A copy missing a component its index names (an interrupted copy, say).
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models.sd15, broken)
    shutil.rmtree(broken / "unet")
    a = model_availability(spec(path=broken))
    assert a.status is Availability.missing and a.why == "its folder lacks the 'unet' component"
    (broken / "model_index.json").write_text("{not json")
    assert model_availability(spec(path=broken)).why == "its model_index.json is not valid JSON"
    # Components declared absent ([null, null]) are not required.
    good = tmp_path / "good"
    shutil.copytree(tiny_models.sd15, good)
    index = json.loads((good / "model_index.json").read_text())
    index["safety_checker"] = [None, None]
    (good / "model_index.json").write_text(json.dumps(index))
    assert model_availability(spec(path=good)).status is Availability.folder


def test_single_file(tmp_path: Path) -> None:
    ckpt = tmp_path / "m.safetensors"
    assert model_availability(spec(file=ckpt)).status is Availability.missing
    ckpt.write_bytes(b"x")
    assert model_availability(spec(file=ckpt)).status is Availability.file


def test_a_repo_offline_online_and_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    s = spec(repo="someone/not-here")
    offline = model_availability(s, offline=True)
    assert offline.status is Availability.missing
    assert offline.how is not None and "huggingface-cli download someone/not-here" in offline.how
    from huggingface_hub import constants

    with FakeHub() as hub:  # online: the hub answers its probe
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        forget_probes()
        assert model_availability(s, offline=False).status is Availability.downloadable
    # In the cache (asked through huggingface_hub's cache API): available offline.
    monkeypatch.setattr("cluster.registry.hub_cached", lambda repo: repo == "someone/not-here")
    assert model_availability(s, offline=True).status is Availability.cached


def test_a_repo_in_a_real_hub_cache_is_found_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The cache layout huggingface_hub reads: refs/main names a snapshot holding the files.
    from huggingface_hub import constants

    repo_dir = tmp_path / "models--someone--cached"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text("abc123")
    snap = repo_dir / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "model_index.json").write_text("{}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.file_download.HF_HUB_CACHE", str(tmp_path),
                        raising=False)
    assert model_availability(spec(repo="someone/cached"), offline=True).status is (
        Availability.cached)
