"""Engine: every job kind on both tiny families, infotext round trips, per-image determinism
inside batches, cancellation within one step, scheduler views, and input checks."""

from __future__ import annotations

import dataclasses
import io
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image

from cluster.contract import BatchItem, GenerationCancelled, ImageResult, JobRejected
from core.errors import InvalidRequest
from core.infotext import parse_infotext, read_png_infotext
from core.recipe import UPSCALE_STRENGTH, VARIATION_SEED_OFFSET, pipeline_steps
from core.request import SCHEDULERS, GenerationRequest, JobKind
from engine.cache import ModelCache
from engine.devices import DeviceProfile
from engine.engine import Engine
from engine.schedulers import SCHEDULER_CLASSES, make_scheduler, with_scheduler

if TYPE_CHECKING:
    from tests.cluster.conftest import TinyModels

FAMILIES = ("sd15", "sdxl")
SIZE = 64


@pytest.fixture(scope="module")
def cache(tiny_models: TinyModels, cpu_profile: DeviceProfile) -> ModelCache:
    return ModelCache(tiny_models.registry, cpu_profile, 10**9, offline=True)


@pytest.fixture(scope="module")
def engine(cache: ModelCache, cpu_profile: DeviceProfile) -> Engine:
    return Engine(cache, profile=cpu_profile)


def request(family: str, **fields: object) -> GenerationRequest:
    base: dict[str, object] = {
        "prompt": "a lighthouse at dusk",
        "model": {"sd15": "tiny", "sdxl": "tiny-xl"}[family],
        "width": SIZE,
        "height": SIZE,
        "steps": 2,
        "seed": 1234,
    }
    return GenerationRequest(**(base | fields))  # type: ignore[arg-type]


def pixels(result: ImageResult) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.png)).convert("RGB"), dtype=np.int16)


def source_png(size: int = SIZE) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def mask_png(size: int = SIZE) -> bytes:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[:, size // 2 :] = 255
    buf = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buf, "PNG")
    return buf.getvalue()


def check_infotext(result: ImageResult, req: GenerationRequest, width: int, height: int) -> None:
    text = read_png_infotext(result.png)
    assert text == result.infotext
    info = parse_infotext(text)
    assert info.prompt == result.prompt and req.prompt in info.prompt
    assert info.negative == result.negative
    # What the request left out ran (and is recorded) as the model's default.
    tiny = {"tiny": ("Euler", 7.0), "tiny-xl": ("Euler", 5.0)}[str(req.model)]
    assert (info.seed, info.steps, info.sampler, info.cfg_scale) == (
        result.seed,
        req.steps,
        req.scheduler or tiny[0],
        req.guidance if req.guidance is not None else tiny[1],
    )
    assert (info.width, info.height) == (width, height) == (result.width, result.height)
    assert info.model == result.model
    assert pixels(result).shape == (height, width, 3)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_kind_generates_with_parseable_infotext(engine: Engine, family: str) -> None:
    init, mask = source_png(), mask_png()
    cases: list[tuple[GenerationRequest, int, float | None]] = [
        (request(family), SIZE, None),
        (request(family, kind="img2img", init_image=init, strength=0.6), SIZE, 0.6),
        (request(family, kind="inpaint", init_image=init, mask=mask), SIZE, 0.75),
        # Upscale: width/height are the output size, the source is enlarged 2x to it.
        (
            request(
                family, kind="upscale", init_image=init, width=2 * SIZE, height=2 * SIZE, steps=4
            ),
            2 * SIZE,
            UPSCALE_STRENGTH,
        ),
        (request(family, kind="variation", init_image=init, strength=0.5), SIZE, 0.5),
    ]
    for req, side, strength in cases:
        [result] = engine.generate([BatchItem(f"job-{req.kind}", req)])
        assert result.job_id == f"job-{req.kind}" and result.index == 0
        assert result.seed == 1234 and result.model == req.model
        check_infotext(result, req, side, side)
        assert parse_infotext(result.infotext).denoising_strength == strength

    # A variation without an image is the same prompt from a nearby seed.
    plain = request(family, kind="variation", count=2)
    results = engine.generate([BatchItem("var", plain)])
    assert [r.seed for r in results] == [1234 + VARIATION_SEED_OFFSET + i for i in range(2)]
    assert parse_infotext(results[0].infotext).denoising_strength is None


@pytest.mark.parametrize("family", FAMILIES)
def test_inpaint_keeps_every_pixel_outside_the_mask(engine: Engine, family: str) -> None:
    """As A1111 overlays the original: the pipeline's VAE round trip alone would shift every
    pixel, painted or not."""
    init = source_png()
    for strength in (0.75, 1.0):
        req = request(family, kind="inpaint", init_image=init, mask=mask_png(), strength=strength)
        [result] = engine.generate([BatchItem("inpaint", req)])
        source = np.asarray(Image.open(io.BytesIO(init)).convert("RGB"), dtype=np.int16)
        diff = np.abs(pixels(result) - source).max(axis=2)
        assert diff[:, : SIZE // 2].max() == 0  # the mask's black half: the original
        assert diff[:, SIZE // 2 :].mean() > 10  # its white half: repainted


@pytest.mark.parametrize("family", FAMILIES)
def test_styles_share_one_call_and_seeds(engine: Engine, family: str) -> None:
    req = request(family, prompt="a fox", styles=("enhance", "anime", "pixel-art"), count=2)
    steps: list[tuple[int, int]] = []
    results = engine.generate(
        [BatchItem("styled", req)], on_progress=lambda s, t: steps.append((s, t))
    )
    assert steps == [(1, 2), (2, 2)]  # one pipeline call for all six images
    assert [r.index for r in results] == list(range(6))
    assert [r.style for r in results] == ["enhance"] * 2 + ["anime"] * 2 + ["pixel-art"] * 2
    assert [r.seed for r in results] == [1234, 1235] * 3  # styles comparable seed for seed
    assert "anime" in results[2].prompt and "pixel" in results[4].prompt
    for r in results:
        check_infotext(r, req, SIZE, SIZE)
        assert parse_infotext(r.infotext).styles == (r.style,)


@pytest.mark.parametrize("family", FAMILIES)
def test_image_depends_only_on_its_own_seed(
    engine: Engine, tiny_models: TinyModels, cpu_profile: DeviceProfile, family: str
) -> None:
    target = request(family, prompt="a red fox in snow", seed=42, steps=3)
    [alone] = engine.generate([BatchItem("t", target)])
    neighbours = [
        BatchItem("a", request(family, prompt="an astronaut riding a horse", seed=7, steps=3)),
        BatchItem("b", request(family, prompt="a bowl of ramen", seed=99, steps=3, count=2)),
        BatchItem("c", request(family, prompt="a castle", seed=3, steps=3), nsfw_allowed=True),
    ]
    batch = engine.generate([neighbours[0], BatchItem("t", target), *neighbours[1:]])
    assert [(r.job_id, r.index) for r in batch] == [
        ("a", 0),
        ("t", 0),
        ("b", 0),
        ("b", 1),
        ("c", 0),
    ]
    in_batch = next(r for r in batch if r.job_id == "t")
    assert in_batch.seed == alone.seed
    assert np.abs(pixels(in_batch) - pixels(alone)).max() <= 2

    # Split into pipeline calls of two images (a small device) the images stay the same.
    small = dataclasses.replace(cpu_profile, max_batch_pixels=2 * SIZE * SIZE)
    split_engine = Engine(
        ModelCache(tiny_models.registry, small, 10**9, offline=True), profile=small
    )
    steps: list[tuple[int, int]] = []
    split = split_engine.generate(
        [neighbours[0], BatchItem("t", target), *neighbours[1:]],
        on_progress=lambda s, t: steps.append((s, t)),
    )
    assert steps[-1] == (9, 9)  # three calls of three steps, counted as one run
    for a, b in zip(batch, split, strict=True):
        assert np.abs(pixels(a) - pixels(b)).max() <= 2


def test_cancel_stops_within_one_step_and_engine_recovers(engine: Engine) -> None:
    req = request("sd15", steps=10)
    seen: list[tuple[int, int]] = []
    cancelled: set[str] = set()

    def progress(step: int, total: int) -> None:
        seen.append((step, total))
        if step == 3:
            cancelled.add("victim")

    with pytest.raises(GenerationCancelled):
        engine.generate(
            [BatchItem("victim", req)], on_progress=progress, cancelled=lambda: cancelled
        )
    assert seen == [(1, 10), (2, 10), (3, 10)]  # no step ran after the cancel

    seen.clear()
    results = engine.generate([BatchItem("next", req)], on_progress=progress)
    assert len(results) == 1 and seen[-1] == (10, 10)


def test_partly_cancelled_batch_drops_only_those_jobs(engine: Engine) -> None:
    cancelled: set[str] = set()

    def progress(step: int, total: int) -> None:
        cancelled.add("gone")

    items = [BatchItem("gone", request("sd15", seed=1)), BatchItem("kept", request("sd15", seed=2))]
    results = engine.generate(items, on_progress=progress, cancelled=lambda: cancelled)
    assert [r.job_id for r in results] == ["kept"]

    with pytest.raises(GenerationCancelled):  # cancelled before it starts: nothing runs
        engine.generate([BatchItem("gone", request("sd15"))], cancelled=lambda: {"gone"})


def test_second_job_on_a_loaded_model_does_not_reload(
    tiny_models: TinyModels, cpu_profile: DeviceProfile
) -> None:
    cache = ModelCache(tiny_models.registry, cpu_profile, 10**9, offline=True)
    engine = Engine(cache, profile=cpu_profile)
    engine.generate([BatchItem("one", request("sd15"))])
    assert cache.loads == 1
    engine.generate([BatchItem("two", request("sd15", prompt="a cat", seed=5))])
    engine.generate([BatchItem("three", request("sd15", kind="img2img", init_image=source_png()))])
    assert cache.loads == 1 and cache.hits == 2


def test_mixed_batch_keys_are_refused(engine: Engine) -> None:
    items = [BatchItem("a", request("sd15")), BatchItem("b", request("sd15", width=128))]
    with pytest.raises(InvalidRequest, match=r"'a' and 'b'.*width 64 vs 128"):
        engine.generate(items)
    with pytest.raises(InvalidRequest, match="at least one job"):
        engine.generate([])
    with pytest.raises(InvalidRequest, match="seed must be resolved"):
        engine.generate([BatchItem("a", request("sd15", seed=None))])


def test_an_input_image_always_gets_a_denoising_step(engine: Engine) -> None:
    # Diffusers runs int(steps * strength) steps: 2 x 0.3 would be none, so the engine adds
    # steps until one runs (A1111 does the same); the infotext keeps the request's numbers.
    upscale = request("sd15", kind="upscale", init_image=source_png(), width=128, height=128)
    assert pipeline_steps(upscale) == 4 and pipeline_steps(request("sd15")) == 2
    steps: list[tuple[int, int]] = []
    [result] = engine.generate(
        [BatchItem("up", upscale)], on_progress=lambda s, t: steps.append((s, t))
    )
    assert steps == [(1, 1)]
    assert parse_infotext(result.infotext).steps == 2


def test_bad_job_is_rejected_by_id(engine: Engine) -> None:
    blocked = BatchItem("bad", request("sd15", prompt="loli"))
    with pytest.raises(JobRejected) as info:
        engine.generate([BatchItem("ok", request("sd15")), blocked])
    assert info.value.job_id == "bad" and info.value.code == "content_blocked"

    # The real tokenizer counts: a long prompt is refused naming where the model stops reading.
    long = BatchItem("long", request("sd15", prompt="zyx " * 80))
    with pytest.raises(JobRejected, match="the model reads 75") as info:
        engine.generate([long])
    assert info.value.code == "prompt_too_long"


def test_every_sampler_runs_without_touching_the_cached_pipeline(
    engine: Engine, cache: ModelCache
) -> None:
    assert set(SCHEDULER_CLASSES) == set(SCHEDULERS)
    base = cache.get("tiny", JobKind.txt2img)
    before = (base.scheduler, dict(base.config))
    for name in SCHEDULERS:
        [result] = engine.generate([BatchItem(name, request("sd15", scheduler=name))])
        assert parse_infotext(result.infotext).sampler == name
    assert (base.scheduler, dict(base.config)) == before

    karras = make_scheduler("DPM++ 2M Karras", base.scheduler.config)
    assert type(karras).__name__ == "DPMSolverMultistepScheduler"
    assert karras.config.use_karras_sigmas is True
    view = with_scheduler(base, karras)
    assert view.scheduler is karras and view.unet is base.unet and base.scheduler is not karras
