"""A box that cannot reach the Hugging Face hub (no HF_HUB_OFFLINE set): one bounded probe says
so, its answer is kept, repo models count as missing, and a load that cannot download fails for
good at once, in one line; a hub that answers "no such repo" or "gated" is no better."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.availability import Availability, loadable_models, model_availability
from cluster.hub import UNREACHABLE, forget_probes, hub_reachable
from cluster.registry import ModelRegistry, ModelSpec
from core.settings import load_settings
from testing.hub import FakeHub, closed_port_url

REPO_SPEC = {
    "name": "ghost", "repo": "nobody/ghost", "family": "sd15", "min_vram_gb": 0,
    "default_width": 64, "default_height": 64, "max_width": 512, "max_height": 512,
    "default_steps": 4, "max_steps": 50, "scheduler": "Euler", "guidance": 7.0,
}


@pytest.fixture(autouse=True)
def _fresh_probes() -> None:
    forget_probes()


def test_the_probe_is_bounded_and_its_answer_kept() -> None:
    closed = closed_port_url()
    began = time.monotonic()
    assert hub_reachable(closed) is False
    assert time.monotonic() - began < 5
    with FakeHub() as hub:
        assert hub_reachable(hub.url) is True
        assert hub_reachable(hub.url) is True
        assert len(hub.requests) == 1, hub.requests  # asked once, then remembered
        assert hub.requests[0].startswith("HEAD /api/models?")
    # Kept for its time to live even though the hub is gone now; asked again after it.
    assert hub_reachable(hub.url) is True
    assert hub_reachable(hub.url, ttl_s=0) is False


def test_an_unreachable_hub_makes_repo_models_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", closed_port_url())
    spec = ModelSpec(**REPO_SPEC)  # type: ignore[arg-type]
    here = model_availability(spec, offline=False)
    assert here.status is Availability.missing and here.why == UNREACHABLE
    assert here.line().startswith(f"ghost: not available ({UNREACHABLE}); run `huggingface-cli")
    with FakeHub() as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        assert model_availability(spec, offline=False).status is Availability.downloadable


def test_what_a_worker_publishes_uses_the_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", closed_port_url())
    settings = load_settings(data_dir=tmp_path, _env_file=None)
    names = loadable_models(ModelRegistry.load(settings), offline=False)
    # The shipped demo model loads anywhere; no hub repo does from here.
    assert "demo" in names
    assert not {"sd15", "sdxl", "sd-turbo", "sdxl-turbo"} & set(names), names


_LOAD = """
import json, sys, time
import diffusers, torch  # imported first, as in a worker: the bound is on the failure itself
from cluster.registry import ModelSpec
from engine.loading import load_pipeline
from core.errors import ModelUnavailable
spec = ModelSpec(**json.loads(sys.argv[1]))
began = time.monotonic()
try:
    load_pipeline(spec, torch_dtype=torch.float32)
except ModelUnavailable as exc:
    took = time.monotonic() - began
    print(json.dumps({"type": "unavailable", "message": exc.message, "s": took}))
except Exception as exc:
    print(json.dumps({"type": type(exc).__name__, "message": str(exc)}))
"""


def _load_in_a_process(endpoint: str) -> dict[str, object]:
    """load_pipeline in a process of its own, as a worker runs it: HF_ENDPOINT set, and no
    HF_HUB_OFFLINE (huggingface_hub reads both once, at import)."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env |= {"HF_ENDPOINT": endpoint, "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost"}
    done = subprocess.run(
        [sys.executable, "-c", _LOAD, json.dumps(REPO_SPEC)], env=env, capture_output=True,
        text=True, timeout=120, cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.slow
@pytest.mark.pipelines  # Diffusers and torch, in a process of their own
def test_a_load_that_cannot_download_fails_for_good_at_once() -> None:
    # No hub here: refused before any download is tried.
    result = _load_in_a_process(closed_port_url())
    assert result["type"] == "unavailable", result
    assert f"model 'ghost' is not available: {UNREACHABLE}." in str(result["message"]), result
    assert float(result["s"]) < 15  # type: ignore[arg-type]
    # A hub that answers, but has no such repo (what the hub says without a token, too).
    with FakeHub() as hub:
        result = _load_in_a_process(hub.url)
    assert result["type"] == "unavailable", result
    assert "the Hugging Face hub has no such repo" in str(result["message"]), result
    assert float(result["s"]) < 15  # type: ignore[arg-type]
    with FakeHub(error="GatedRepo", status=403) as hub:
        result = _load_in_a_process(hub.url)
    assert result["type"] == "unavailable", result
    assert "it is gated on the Hugging Face hub" in str(result["message"]), result
