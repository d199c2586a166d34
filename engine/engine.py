"""The Diffusers recipe a worker runs: compatible jobs from different people become one pipeline
call with per-image prompts and seeds; images come back as PNGs carrying A1111 infotext."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cluster.contract import BatchItem, GenerationCancelled, ImageResult, JobRejected
from core.control import control_map
from core.errors import AtelierError, InvalidRequest
from core.images import decode_png_mask, decode_png_rgb
from core.infotext import format_infotext, infotext_for, png_with_infotext
from core.prompts import (
    CLIP_TOKEN_LIMIT,
    Blocklist,
    TokenCounter,
    default_blocklist,
    prepare_prompt,
)
from core.recipe import (
    KEY_FIELDS,
    UPSCALE_STRENGTH,
    batch_key,
    effective_strength,
    image_seeds,
    pipeline_kind,
    pipeline_steps,
)
from core.request import GenerationRequest, JobKind
from core.styles import StyleRegistry, default_registry
from engine.cache import ModelCache
from engine.controlnets import ControlNetCache, control_pipeline
from engine.devices import DeviceProfile
from engine.loras import AdapterCache
from engine.schedulers import SchedulerCache, with_scheduler
from engine.stepcache import reset_step_cache

if TYPE_CHECKING:
    from PIL import Image

    from engine.pipelines import Pipeline as DiffusionPipeline

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
CancelledFn = Callable[[], Collection[str]]


@dataclass(frozen=True)
class _Slot:
    """One output image of the pipeline call and everything needed to report it."""

    job_id: str
    index: int
    seed: int
    style: str | None
    prompt: str
    negative: str
    info_request: GenerationRequest  # what the infotext describes (the style actually used)
    image: Image.Image | None = None
    mask: Image.Image | None = None
    control: Image.Image | None = None  # the ControlNet's map for this image


class Engine:
    """Runs batches of compatible jobs on one device, one batch at a time."""

    def __init__(
        self, cache: ModelCache, *, profile: DeviceProfile,
        styles: StyleRegistry | None = None, blocklist: Blocklist | None = None,
    ) -> None:
        import torch

        self.cache = cache
        self.profile = profile
        self.styles = styles if styles is not None else default_registry()
        self.blocklist = blocklist if blocklist is not None else default_blocklist()
        self._schedulers = SchedulerCache()
        # LoRAs kept beside the cached models (as many per model as the profile says),
        # switched per batch.
        self.adapters = AdapterCache(cache.registry.adapters, capacity=profile.lora_slots)
        # ControlNets kept loaded, and each model pipeline's ControlNet views (weights shared).
        self.controlnets = ControlNetCache(
            cache.registry.adapters, capacity=profile.controlnet_slots
        )
        self._control_views: weakref.WeakKeyDictionary[Any, dict[tuple[str, str], Any]] = (
            weakref.WeakKeyDictionary()
        )
        # Cached schedulers and the VAE tiling switch are per-call state: one batch at a time.
        self._lock = threading.Lock()
        self.compile_seconds: dict[str, float] = {}  # model -> its first compiled call's time
        if profile.threads:
            torch.set_num_threads(profile.threads)  # process-wide, so once, here

    def generate(
        self, items: list[BatchItem], *, on_progress: ProgressFn | None = None,
        cancelled: CancelledFn | None = None,
    ) -> list[ImageResult]:
        """Generate every image of ``items`` in one pipeline call (chunked to the device's
        ``max_batch_pixels``). Raises InvalidRequest, JobRejected, ModelLoadError, or
        GenerationCancelled when every job is cancelled; a partly cancelled batch finishes
        and leaves out the cancelled jobs' images."""
        # 1. Check inputs: one batch key, resolved seeds, unique job ids; what a request left
        #    to its model (one that did not come through submit) gets the model's defaults.
        items = [self._with_defaults(item) for item in items]
        first = self._check_inputs(items)
        job_ids = frozenset(item.job_id for item in items)
        with self._lock:
            # 2. The pipeline for this kind, viewed with this batch's scheduler.
            spec = self.cache.registry.get(first.model)
            base = self.cache.get(spec.name, pipeline_kind(first))
            p = first.params()
            scheduler = self._schedulers.get(spec.name, p.scheduler, base.scheduler.config)
            pipe = with_scheduler(self._with_control(spec.name, base, first), scheduler)
            # 2b. This batch's LoRAs at their weights (LoRAs off for a batch without any), and
            #     the embeddings whose tokens its prompts use.
            self.adapters.apply(base, first.adapters)
            texts = [t for item in items for t in (item.request.prompt, item.request.negative)]
            self.adapters.embed(base, spec.family.value, texts, model=spec.name)

            # 3. Prompts per style and seeds per image: one slot per output image.
            slots = self._plan(items, count_tokens=token_counter(pipe.tokenizer))
            _check_cancelled(job_ids, cancelled)

            # 4.-5. Per-image generators and run, in calls that fit the device's batch budget.
            profile = self.cache.profile_of(spec.name)
            per_call = max(1, profile.max_batch_pixels // (p.width * p.height))
            chunks = [slots[i : i + per_call] for i in range(0, len(slots), per_call)]
            progress = _Progress(job_ids, len(chunks), on_progress, cancelled)
            outputs: list[tuple[_Slot, Image.Image]] = []
            with _vae_tiling(pipe, profile.needs_vae_tiling(p.width, p.height)):
                for progress.chunk, chunk in enumerate(chunks):
                    gone = _cancelled_now(cancelled)
                    live = [s for s in chunk if s.job_id not in gone]
                    if live:
                        started = time.perf_counter()
                        images = self._run(pipe, first, live, progress.callback)
                        if profile.compile and spec.name not in self.compile_seconds:
                            self._report_compile(spec.name, time.perf_counter() - started)
                        outputs.extend(zip(live, images, strict=True))

        # 6. Encode PNGs with the A1111 infotext (generation settings only, nobody's identity).
        gone = _check_cancelled(job_ids, cancelled)
        # 7. One ImageResult per image, in job order then index order (style-major).
        return [
            _encode(slot, image, spec.name) for slot, image in outputs if slot.job_id not in gone
        ]

    # Steps ------------------------------------------------------------------------------

    def _report_compile(self, model: str, seconds: float) -> None:
        """Once per model: its first compiled call, which includes torch.compile's work
        (less when inductor's on-disk cache already holds the kernels)."""
        self.compile_seconds[model] = seconds
        log.info("compiled UNet of %s: first call took %.1f s, compile included", model, seconds)

    def _with_control(
        self, model: str, base: DiffusionPipeline, request: GenerationRequest
    ) -> DiffusionPipeline:
        """``base`` itself, or its ControlNet view when the batch has a control unit."""
        if request.control is None or request.control.controlnet is None:
            return base
        name, kind = request.control.controlnet, pipeline_kind(request)
        profile = self.cache.profile_of(model)
        controlnet = self.controlnets.get(name, dtype=profile.torch_dtype, device=profile.device)
        views = self._control_views.setdefault(base, {})
        # Views of ControlNets the cache let go would keep their weights alive: drop them.
        kept = self.controlnets.loaded()
        for key in [k for k in views if k[0] not in kept]:
            del views[key]
        view = views.get((name, kind.value))
        if view is None or view.controlnet is not controlnet:
            view = views[(name, kind.value)] = control_pipeline(base, kind, controlnet)
        return view

    def _with_defaults(self, item: BatchItem) -> BatchItem:
        if not item.request.unresolved:
            return item
        spec = self.cache.registry.get(item.request.model)
        return dataclasses.replace(item, request=item.request.with_model_defaults(spec.defaults))

    def _check_inputs(self, items: Sequence[BatchItem]) -> GenerationRequest:
        if not items:
            raise InvalidRequest("a batch needs at least one job, got none")
        seen: set[str] = set()
        first = items[0]
        key = batch_key(first.request)
        for item in items:
            if item.job_id in seen:
                raise InvalidRequest(f"job {item.job_id!r} appears twice in one batch")
            seen.add(item.job_id)
            if item.request.seed is None:
                raise InvalidRequest(
                    f"job {item.job_id!r}: the seed must be resolved before generating, got None"
                )
            other = batch_key(item.request)
            if other != key:
                diff = ", ".join(
                    f"{name} {a!r} vs {b!r}"
                    for name, a, b in zip(KEY_FIELDS, key, other, strict=True)
                    if a != b
                )
                raise InvalidRequest(
                    f"jobs {first.job_id!r} and {item.job_id!r} cannot share one pipeline call: "
                    f"{diff}"
                )
        return first.request

    def _plan(self, items: Sequence[BatchItem], *, count_tokens: TokenCounter) -> list[_Slot]:
        """Style-major slots per job: style 0 images 0..count-1, style 1, ... (same seeds)."""
        slots: list[_Slot] = []
        for item in items:
            request = item.request
            try:
                pairs = _carried(item, count_tokens) or prepare_prompt(
                    request, self.styles, self.blocklist, item.nsfw_allowed, count_tokens
                )
                image, mask = _inputs(request)
                control = (
                    control_map(request.control, int(request.width or 0), int(request.height or 0))
                    if request.control is not None else None
                )
            except AtelierError as exc:
                raise JobRejected(item.job_id, exc.message, exc.code) from exc
            seeds = image_seeds(request)
            styles: list[str | None] = list(request.styles) or [None]
            for style_no, (style, (prompt, negative)) in enumerate(zip(styles, pairs, strict=True)):
                info_request = _info_request(request, style)
                for n, seed in enumerate(seeds):
                    index = style_no * len(seeds) + n
                    slots.append(
                        _Slot(item.job_id, index, seed, style, prompt, negative, info_request,
                              image, mask, control)
                    )
        return slots

    def _run(
        self, pipe: DiffusionPipeline, request: GenerationRequest, slots: Sequence[_Slot],
        callback: Callable[..., dict[str, Any]],
    ) -> list[Image.Image]:
        import torch

        # CPU generators on every device: the same seed starts from the same noise on a CPU
        # worker and on any GPU class, so a reroll or upscale may land on any worker.
        generators = [torch.Generator("cpu").manual_seed(s.seed) for s in slots]
        kwargs: dict[str, Any] = {
            "prompt": [s.prompt for s in slots],
            "negative_prompt": [s.negative for s in slots],
            "num_inference_steps": pipeline_steps(request),
            "guidance_scale": request.guidance,
            "generator": generators,
            "callback_on_step_end": callback,
            "output_type": "pil",
        }
        kind = pipeline_kind(request)
        if kind is not JobKind.img2img:  # img2img takes its size from the (resized) image
            kwargs |= {"height": request.height, "width": request.width}
        if kind is not JobKind.txt2img:
            kwargs |= {"image": [s.image for s in slots], "strength": effective_strength(request)}
        if kind is JobKind.inpaint:
            kwargs["mask_image"] = [s.mask for s in slots]
        if request.control is not None:
            unit = request.control
            # txt2img ControlNet pipelines take the map as ``image``; the others as control_image.
            key = "image" if kind is JobKind.txt2img else "control_image"
            kwargs |= {
                key: [s.control for s in slots],
                "controlnet_conditioning_scale": unit.weight,
                "control_guidance_start": unit.start,
                "control_guidance_end": unit.end,
            }
        reset_step_cache(pipe.unet)  # fast mode: kept features belong to the previous call
        with torch.inference_mode():
            out = pipe(**kwargs)
        if kind is JobKind.inpaint:
            return [_keep_unmasked(image, s) for image, s in zip(out.images, slots, strict=True)]
        return list(out.images)


class _Progress:
    """``callback_on_step_end``: reports (step, total) over all chunks and stops the call as
    soon as every job of the batch is cancelled."""

    def __init__(
        self, job_ids: frozenset[str], chunks: int, on_progress: ProgressFn | None,
        cancelled: CancelledFn | None,
    ) -> None:
        self.job_ids = job_ids
        self.chunks = chunks
        self.chunk = 0
        self.on_progress = on_progress
        self.cancelled = cancelled

    def callback(
        self, pipe: DiffusionPipeline, i: int, t: Any, kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        steps = int(pipe.num_timesteps)
        if self.on_progress is not None:
            self.on_progress(self.chunk * steps + i + 1, self.chunks * steps)
        if self.cancelled is not None and _cancelled_now(self.cancelled) >= self.job_ids:
            # Diffusers skips the remaining steps once _interrupt is set, but would still decode
            # the latents; raising here ends the call now, with no further UNet or VAE work.
            pipe._interrupt = True
            raise GenerationCancelled("every job of the batch was cancelled")
        return kwargs


def _cancelled_now(cancelled: CancelledFn | None) -> frozenset[str]:
    return frozenset(cancelled()) if cancelled is not None else frozenset()


def _check_cancelled(job_ids: frozenset[str], cancelled: CancelledFn | None) -> frozenset[str]:
    """The cancelled job ids; GenerationCancelled when they are all of the batch."""
    gone = _cancelled_now(cancelled)
    if gone >= job_ids:
        raise GenerationCancelled("every job of the batch was cancelled")
    return gone


@contextmanager
def _vae_tiling(pipe: DiffusionPipeline, needed: bool) -> Iterator[None]:
    """Decode tiled for this call only when the image is too large to decode whole."""
    switch = needed and not getattr(pipe.vae, "use_tiling", False)
    if switch:
        pipe.vae.enable_tiling()
    try:
        yield
    finally:
        if switch:
            pipe.vae.disable_tiling()


def _encode(slot: _Slot, image: Image.Image, model: str) -> ImageResult:
    info = infotext_for(
        slot.info_request, prompt=slot.prompt, negative=slot.negative, seed=slot.seed, model=model
    )
    text = format_infotext(info)
    return ImageResult(
        job_id=slot.job_id, index=slot.index, seed=slot.seed, style=slot.style,
        png=png_with_infotext(image, text), width=image.width, height=image.height,
        prompt=slot.prompt, negative=slot.negative, infotext=text, model=model,
    )


def token_counter(tokenizer: Any) -> TokenCounter:
    """The real tokenizer's count, without the start/end tokens (what prepare_prompt expects)."""

    def count(text: str) -> int:
        # verbose=False: a too-long candidate is expected here, not worth transformers' warning.
        ids = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)
        return len(ids["input_ids"])

    return count


def _carried(item: BatchItem, count_tokens: TokenCounter) -> list[tuple[str, str]] | None:
    """The pairs admission prepared, when every text fits the real tokenizer's window (its
    estimate leans high, so nearly always); None: prepare them here, with the real count."""
    if item.prompts is None:
        return None
    pairs = list(item.prompts)
    fits = all(count_tokens(text) <= CLIP_TOKEN_LIMIT for pair in pairs for text in pair)
    return pairs if fits else None


def _inputs(request: GenerationRequest) -> tuple[Image.Image | None, Image.Image | None]:
    """The init image and mask resized to the request's size (the output size).

    For an upscale the request's width/height are the output size (normally 2x the source):
    the source is enlarged to it with Lanczos, then lightly denoised by img2img.
    """
    from PIL import Image

    width, height, _ = request.size_and_steps()
    size = (width, height)
    image = mask = None
    if request.init_image is not None and pipeline_kind(request) is not JobKind.txt2img:
        image = decode_png_rgb(request.init_image)
        if image.size != size:
            image = image.resize(size, Image.Resampling.LANCZOS)
    if request.mask is not None and request.kind is JobKind.inpaint:
        mask = decode_png_mask(request.mask)
        if mask.size != size:
            mask = mask.resize(size, Image.Resampling.BILINEAR)
    return image, mask


def _keep_unmasked(image: Image.Image, slot: _Slot) -> Image.Image:
    """The original pasted back where the mask is black, as A1111 overlays it: the VAE's
    round trip (and the 4-channel UNet's blended latents) would otherwise shift every pixel
    outside the painted region."""
    from PIL import Image

    if slot.image is None or slot.mask is None:
        return image
    original = slot.image if slot.image.size == image.size else slot.image.resize(image.size)
    mask = slot.mask if slot.mask.size == image.size else slot.mask.resize(image.size)
    return Image.composite(image.convert("RGB"), original, mask)


def _info_request(request: GenerationRequest, style: str | None) -> GenerationRequest:
    """The request as its infotext should describe one image: only the style it used, and the
    settings that reproduce it (a variation without an image is a txt2img at its own seed)."""
    update: dict[str, Any] = {"styles": (style,) if style else ()}
    if request.kind is JobKind.variation and request.init_image is None:
        update["kind"] = JobKind.txt2img
    elif request.kind is JobKind.upscale:
        update |= {"kind": JobKind.img2img, "strength": UPSCALE_STRENGTH}
    return request.model_copy(update=update)
