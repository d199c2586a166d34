"""Model cache: a loaded model is reused (no second load), siblings are cached with their base,
and the least recently used model is evicted under the memory budget."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import diffusers
import pytest

from core.errors import InvalidRequest, ModelUnavailable
from core.request import JobKind
from engine.cache import ModelCache, describe_cache, estimate_params, pipeline_bytes
from engine.devices import DeviceInfo, DeviceProfile

if TYPE_CHECKING:
    from tests.cluster.conftest import TinyModels


@pytest.fixture
def from_pretrained_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every real AutoPipelineForText2Image.from_pretrained call, by path (still loads)."""
    calls: list[str] = []
    real = diffusers.AutoPipelineForText2Image.from_pretrained.__func__  # type: ignore[attr-defined]

    def counting(cls: Any, path: str, **kwargs: Any) -> Any:
        calls.append(str(path))
        return real(cls, path, **kwargs)

    monkeypatch.setattr(
        diffusers.AutoPipelineForText2Image, "from_pretrained", classmethod(counting)
    )
    return calls


def make_cache(tiny: TinyModels, profile: DeviceProfile, budget: int) -> ModelCache:
    return ModelCache(tiny.registry, profile, budget, offline=True)


def test_second_get_does_not_reload(
    tiny_models: TinyModels, cpu_profile: DeviceProfile, from_pretrained_calls: list[str]
) -> None:
    cache = make_cache(tiny_models, cpu_profile, budget=10**9)
    first = cache.get("tiny", JobKind.txt2img)
    second = cache.get("tiny", JobKind.txt2img)
    assert second is first
    assert cache.loads == 1 and cache.hits == 1
    assert from_pretrained_calls == [str(tiny_models.sd15)]
    assert cache.loaded() == ["tiny"]


def test_siblings_are_cached_with_their_base(
    tiny_models: TinyModels, cpu_profile: DeviceProfile, from_pretrained_calls: list[str]
) -> None:
    cache = make_cache(tiny_models, cpu_profile, budget=10**9)
    img2img = cache.get("tiny-xl", JobKind.img2img)  # the base loads on the sibling's demand
    t2i = cache.get("tiny-xl", JobKind.txt2img)
    inpaint = cache.get("tiny-xl", JobKind.inpaint)
    assert type(img2img).__name__ == "StableDiffusionXLImg2ImgPipeline"
    assert type(inpaint).__name__ == "StableDiffusionXLInpaintPipeline"
    assert img2img.unet is t2i.unet and inpaint.unet is t2i.unet
    assert cache.get("tiny-xl", JobKind.img2img) is img2img
    assert cache.get("tiny-xl", JobKind.variation) is img2img
    assert cache.loads == 1 and len(from_pretrained_calls) == 1
    # Siblings add no weights.
    assert cache.used_bytes == pipeline_bytes(t2i)


def test_profile_is_applied(tiny_models: TinyModels, cpu_profile: DeviceProfile) -> None:
    pipe = make_cache(tiny_models, cpu_profile, budget=10**9).get("tiny")
    assert str(pipe.unet.dtype) == f"torch.{cpu_profile.dtype}"
    assert pipe.vae.use_slicing is cpu_profile.vae_slicing


def test_estimate_matches_loaded_size(tiny_models: TinyModels, cpu_profile: DeviceProfile) -> None:
    cache = make_cache(tiny_models, cpu_profile, budget=10**9)
    for name in ("tiny", "tiny-xl"):
        spec = tiny_models.registry.get(name)
        estimate = cache.size_of(name)
        pipe = cache.get(name)
        params = sum(
            p.numel() for m in pipe.components.values() if hasattr(m, "parameters")
            for p in m.parameters()
        )
        assert estimate_params(spec) == params  # read from the safetensors headers
        assert abs(cache.size_of(name) - estimate) / estimate < 0.01  # + a few buffers


def test_lru_eviction_under_budget(
    tiny_models: TinyModels, cpu_profile: DeviceProfile, from_pretrained_calls: list[str]
) -> None:
    probe = make_cache(tiny_models, cpu_profile, budget=10**9)
    sd15, sdxl = probe.size_of("tiny"), probe.size_of("tiny-xl")
    # Room for either model, not both.
    cache = make_cache(tiny_models, cpu_profile, budget=max(sd15, sdxl) + min(sd15, sdxl) // 2)

    a = cache.get("tiny")
    cache.get("tiny-xl")
    assert cache.loaded() == ["tiny-xl"]
    assert cache.evictions == 1
    assert cache.used_bytes <= cache.budget_bytes
    again = cache.get("tiny")  # evicted, so loaded afresh
    assert again is not a
    assert cache.loaded() == ["tiny"]
    assert cache.loads == 3 and len(from_pretrained_calls) == 3


def test_least_recently_used_goes_first(
    tiny_models: TinyModels, cpu_profile: DeviceProfile
) -> None:
    # A second registry entry for the same folder gives three models to juggle.
    registry = tiny_models.registry.with_models(
        tiny_models.registry.get("tiny").model_copy(update={"name": "tiny-b"})
    )
    probe = ModelCache(registry, cpu_profile, 10**9, offline=True)
    sizes = {n: probe.size_of(n) for n in ("tiny", "tiny-b", "tiny-xl")}
    budget = sizes["tiny"] + sizes["tiny-b"] + sizes["tiny-xl"] // 2
    cache = ModelCache(registry, cpu_profile, budget, offline=True)
    cache.get("tiny")
    cache.get("tiny-b")
    cache.get("tiny", JobKind.img2img)  # touching "tiny" makes "tiny-b" the oldest
    assert cache.loaded() == ["tiny-b", "tiny"]
    cache.get("tiny-xl")
    assert "tiny-b" not in cache.loaded() and "tiny" in cache.loaded()
    assert cache.loaded()[-1] == "tiny-xl"
    snapshot = describe_cache(cache)
    assert snapshot["loads"] == 3 and snapshot["loaded"] == cache.loaded()


def test_model_larger_than_budget_loads_alone(
    tiny_models: TinyModels, cpu_profile: DeviceProfile
) -> None:
    cache = make_cache(tiny_models, cpu_profile, budget=1)
    cache.get("tiny")
    cache.get("tiny-xl")
    assert cache.loaded() == ["tiny-xl"]


def test_evict_and_clear(tiny_models: TinyModels, cpu_profile: DeviceProfile) -> None:
    cache = make_cache(tiny_models, cpu_profile, budget=10**9)
    cache.get("tiny")
    cache.get("tiny-xl")
    assert cache.evict("tiny") is True and cache.evict("tiny") is False
    cache.clear()
    assert cache.loaded() == [] and cache.used_bytes == 0


def test_errors_leave_the_cache_empty(
    tiny_models: TinyModels, cpu_profile: DeviceProfile, tmp_path: Any
) -> None:
    registry = tiny_models.registry.with_models(
        tiny_models.registry.get("tiny").model_copy(
            update={"name": "gone", "path": tmp_path / "gone", "hint": None}
        )
    )
    cache = ModelCache(registry, cpu_profile, 10**9, offline=True)
    with pytest.raises(InvalidRequest, match="unknown model 'nope'"):
        cache.get("nope")
    with pytest.raises(ModelUnavailable, match="model 'gone' is not available"):
        cache.get("gone")
    assert cache.loaded() == [] and cache.loads == 0


def test_per_model_profiles_from_device_info(
    tiny_models: TinyModels, cpu_profile: DeviceProfile
) -> None:
    card = DeviceInfo(
        kind="cuda", name="NVIDIA GeForce RTX 3070", index=0, capability=(8, 6),
        total_memory=8_361_017_344, bf16=True,
    )
    registry = tiny_models.registry.with_models(
        tiny_models.registry.get("tiny-xl").model_copy(update={"compile": True, "fast": True})
    )
    cache = ModelCache(registry, cpu_profile, 10**9, device_info=card, offline=True)
    # Offload depends on the family; compile/fast are the model's own opt-ins.
    assert cache.profile_of("tiny").offload == "none"
    xl = cache.profile_of("tiny-xl")
    assert (xl.offload, xl.compile, xl.fast) == ("model", True, True)
    assert cache.profile_of("sdxl").compile is False

    bf16_cpu = DeviceInfo(kind="cpu", name="CPU", total_memory=2**34, bf16=True, cpu_bf16=True)
    cache = ModelCache(registry, cpu_profile, 10**9, device_info=bf16_cpu, offline=True)
    pipe = cache.get("tiny-xl")
    assert str(pipe.unet.dtype) == "torch.bfloat16"  # loaded straight in the profile's dtype
    assert cache.size_of("tiny-xl") < 10**9
