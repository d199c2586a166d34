"""LoRAs in the engine, on tiny pipelines with tiny random LoRAs built offline: a LoRA changes
the output, the same way every time, and leaves no trace once off or unloaded; a batch runs one
adapter set; the per-worker LRU loads each LoRA once and evicts past its capacity."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image

from cluster.adapters import AdapterSpec
from cluster.contract import BatchItem, ImageResult
from cluster.registry import ModelRegistry
from core.errors import InvalidRequest, ModelUnavailable
from core.infotext import parse_infotext
from core.recipe import batch_key
from core.request import GenerationRequest
from engine.cache import ModelCache
from engine.devices import DeviceProfile
from engine.engine import Engine
from engine.tiny import make_tiny_embedding, make_tiny_lora

if TYPE_CHECKING:
    from tests.cluster.conftest import TinyModels


@pytest.fixture(scope="module")
def registry(tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    d = tmp_path_factory.mktemp("loras")
    ink = make_tiny_lora(tiny_models.sd15, d / "ink", seed=1)
    neon = make_tiny_lora(tiny_models.sd15, d / "neon", seed=2)
    xl = make_tiny_lora(tiny_models.sdxl, d / "xl", seed=3)
    emb = make_tiny_embedding(tiny_models.sd15, d / "easynegative.safetensors", seed=4)
    return tiny_models.registry.with_adapters(
        AdapterSpec(name="easynegative", kind="embedding", file=str(emb), family="sd15"),
        AdapterSpec(name="ink", file=str(ink), family="sd15"),
        AdapterSpec(name="neon", file=str(neon), family="sd15", default_weight=0.5),
        AdapterSpec(name="xl-ink", file=str(xl), family="sdxl"),
        AdapterSpec(name="gone", file=str(d / "gone.safetensors"), family="sd15"),
    )


def make_engine(registry: ModelRegistry, profile: DeviceProfile, slots: int = 4) -> Engine:
    """An engine whose profile keeps ``slots`` LoRAs per model."""
    profile = replace(profile, lora_slots=slots)
    engine = Engine(ModelCache(registry, profile, 10**9, offline=True), profile=profile)
    assert engine.adapters.capacity == slots  # the worker's cache sizes itself by the profile
    return engine


@pytest.fixture(scope="module")
def engine(registry: ModelRegistry, cpu_profile: DeviceProfile) -> Engine:
    return make_engine(registry, cpu_profile)


def req(prompt: str = "a lighthouse at dusk", model: str = "tiny", seed: int = 7,
        **fields: object) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, model=model, width=64, height=64, steps=2,
                             seed=seed, **fields)  # type: ignore[arg-type]


def pixels(result: ImageResult) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.png)).convert("RGB"), dtype=np.int16)


def close(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal but for batching's float noise (the engine tests' bound: a batch of several on a
    CPU sums in another order than a batch of one)."""
    return bool(np.abs(a - b).max() <= 2)


def run(engine: Engine, *requests: GenerationRequest) -> list[np.ndarray]:
    items = [BatchItem(f"job-{i}", r) for i, r in enumerate(requests)]
    return [pixels(r) for r in engine.generate(items)]


def test_lora_changes_output_deterministically_and_unloads_cleanly(engine: Engine) -> None:
    (base,) = run(engine, req())
    (inked,) = run(engine, req("a lighthouse at dusk <lora:ink:1>"))
    assert np.abs(inked - base).mean() > 2  # the LoRA visibly changes the picture
    (again,) = run(engine, req("a lighthouse at dusk <lora:ink:1>"))
    assert np.array_equal(again, inked)
    (half,) = run(engine, req("a lighthouse at dusk <lora:ink:0.5>"))
    assert not np.array_equal(half, inked) and not np.array_equal(half, base)
    # Off for a batch without LoRAs: exactly the picture from before it was ever loaded.
    (off,) = run(engine, req())
    assert np.array_equal(off, base)
    pipe = engine.cache.get("tiny")
    assert engine.adapters.loaded(pipe) == ["ink"]
    assert engine.adapters.loads == 1  # read from disk once, switched after that
    # Unloaded: the same, and a later use loads it again to the same result.
    assert engine.adapters.unload(pipe, "ink") is True
    assert engine.adapters.loaded(pipe) == []
    (unloaded,) = run(engine, req())
    assert np.array_equal(unloaded, base)
    (reloaded,) = run(engine, req("a lighthouse at dusk <lora:ink:1>"))
    assert np.array_equal(reloaded, inked)


def test_infotext_records_the_lora(engine: Engine) -> None:
    (result,) = engine.generate([BatchItem("j", req("a cat <lora:neon:0.75>", raw=True))])
    assert result.infotext.splitlines()[0] == "a cat <lora:neon:0.75>"
    assert parse_infotext(result.infotext).prompt == "a cat <lora:neon:0.75>"


def test_one_batch_runs_one_adapter_set(engine: Engine) -> None:
    plain, inked = req("a red circle", seed=1), req("a blue square <lora:ink:0.8>", seed=2)
    with pytest.raises(InvalidRequest, match=r"adapters \(\) vs \(\('ink', 0\.8\),\)"):
        engine.generate([BatchItem("a", plain), BatchItem("b", inked)])
    # Two people with the same LoRA share one call, each getting their solo picture; the
    # person without it, in the next call, gets theirs as if no LoRA were ever loaded.
    other = req("a green star <lora:ink:0.8>", seed=3)
    assert batch_key(inked) == batch_key(other) != batch_key(plain)
    solo = [run(engine, r)[0] for r in (plain, inked, other)]
    together = run(engine, inked, other)
    assert close(together[0], solo[1]) and close(together[1], solo[2])
    assert np.array_equal(run(engine, plain)[0], solo[0])


def test_two_loras_and_lru(registry: ModelRegistry, cpu_profile: DeviceProfile) -> None:
    engine = make_engine(registry, cpu_profile, slots=1)
    (inked,) = run(engine, req(prompt="x <lora:ink:1>"))
    (neon,) = run(engine, req(prompt="x <lora:neon>"))  # default weight 0.5
    pipe = engine.cache.get("tiny")
    assert engine.adapters.loaded(pipe) == ["neon"] and engine.adapters.evictions == 1
    (again,) = run(engine, req(prompt="x <lora:ink:1>"))
    assert np.array_equal(again, inked) and engine.adapters.loads == 3
    # Both at once exceed one slot for this call only: neither is evicted mid-batch.
    (both,) = run(engine, req(prompt="x <lora:ink:1> <lora:neon:0.5>"))
    assert not np.array_equal(both, inked) and not np.array_equal(both, neon)
    assert sorted(engine.adapters.loaded(pipe)) == ["ink", "neon"]
    # Unloading the active LoRA beside another is quiet (PEFT warns; each batch sets its own).
    run(engine, req(prompt="x <lora:neon>"))
    assert engine.adapters.unload(pipe, "neon") is True
    (alone,) = run(engine, req(prompt="x <lora:ink:1>"))
    assert np.array_equal(alone, inked)


def test_sdxl_lora_and_missing_file(engine: Engine) -> None:
    (base,) = run(engine, req(model="tiny-xl"))
    (inked,) = run(engine, req("a lighthouse at dusk <lora:xl-ink:1>", model="tiny-xl"))
    assert np.abs(inked - base).mean() > 2
    with pytest.raises(ModelUnavailable, match="LoRA 'gone' is not available: its file does"):
        run(engine, req("x <lora:gone:1>"))


def test_lora_file_is_what_diffusers_saves(registry: ModelRegistry) -> None:
    from safetensors import safe_open

    with safe_open(registry.adapters["ink"].file, "pt") as fh:
        keys = list(fh.keys())
    assert keys and all(k.startswith("unet.") and "lora" in k for k in keys)
    assert Path(registry.adapters["ink"].file).stat().st_size < 200_000


def test_embedding_by_its_token(registry: ModelRegistry, cpu_profile: DeviceProfile) -> None:
    engine = make_engine(registry, cpu_profile)
    (before,) = run(engine, req("a lighthouse", raw=True))
    pipe = engine.cache.get("tiny")
    assert engine.adapters.loads == 0  # no token, nothing loaded
    (embedded,) = run(engine, req("a lighthouse", raw=True, negative="easynegative"))
    assert not close(embedded, before) and engine.adapters.loads == 1
    (again,) = run(engine, req("a lighthouse", raw=True, negative="easynegative"))
    assert np.array_equal(again, embedded) and engine.adapters.loads == 1
    # Loaded, it changes nothing for prompts without its token (one batch may mix them).
    (after,) = run(engine, req("a lighthouse", raw=True))
    assert np.array_equal(after, before)
    both = run(engine, req("a lighthouse", raw=True),
               req("a lighthouse", raw=True, negative="easynegative"))
    assert close(both[0], before) and close(both[1], embedded)
    assert "easynegative" in pipe.tokenizer.get_vocab()
