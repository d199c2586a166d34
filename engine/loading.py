"""Loading a model's Diffusers pipeline from where the catalogue says it is (a Hugging Face repo,
a local folder, a single checkpoint file), with failures that name the model and the fix, and
deriving the img2img/inpaint pipelines from a loaded text-to-image one."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster import registry as catalog
from cluster.hub import UNREACHABLE, hub_endpoint, hub_reachable
from cluster.registry import (
    ModelSpec,
    cause_of,
    fix_broken,
    fix_download,
    fix_location,
    load_failure,
    lower_first,
    settable,
    unavailable,
    where_to_set,
)
from core.errors import InvalidRequest
from core.request import JobKind

if TYPE_CHECKING:
    import torch

    from engine.pipelines import Pipeline as DiffusionPipeline

log = logging.getLogger(__name__)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def load_pipeline(
    spec: ModelSpec,
    *,
    torch_dtype: torch.dtype,
    device: str | torch.device | None = None,
    offline: bool | None = None,
) -> DiffusionPipeline:
    """Load ``spec`` as its text-to-image pipeline in ``torch_dtype`` (on ``device`` if given).

    ``offline`` defaults to HF_HUB_OFFLINE. A repo already in the local hub cache never touches
    the network. A failure no retry can mend (missing files, not cached offline, wrong family,
    not a pipeline) is a ModelUnavailable; any other is a ModelLoadError (naming the model, the
    cause and the fix), which another try or another worker may not meet.
    """
    offline = _hub_offline() if offline is None else offline
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if spec.variant:
        kwargs["variant"] = spec.variant
    if not spec.family.is_xl and not spec.safety_checker:
        kwargs |= {"safety_checker": None, "requires_safety_checker": False}

    if spec.source == "file":
        pipe = _load_single_file(spec, kwargs, offline)
    elif spec.source == "path":
        pipe = _load_folder(spec, kwargs)
    else:
        pipe = _load_repo(spec, kwargs, offline)

    expected = spec.family.pipeline_class
    if type(pipe).__name__ != expected:
        why = (f"it is a {type(pipe).__name__}, but its family {spec.family.value!r} expects a "
               f"{expected}")
        raise unavailable(spec, why, why, f"Set family to the right one {where_to_set(spec)}",
                           how=settable(spec, "family to the right one"))
    if device is not None:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_folder(spec: ModelSpec, kwargs: dict[str, Any]) -> DiffusionPipeline:
    import diffusers

    folder = Path(str(spec.path))
    if not folder.is_dir():
        raise unavailable(spec, "its folder does not exist", f"folder {folder} does not exist",
                           fix_location(spec))
    if not (folder / "model_index.json").is_file():
        raise unavailable(
            spec,
            "its folder has no model_index.json, so it is not a Diffusers pipeline",
            f"folder {folder} has no model_index.json, so it is not a Diffusers pipeline folder",
            f"For a single .safetensors/.ckpt checkpoint set file = ... {where_to_set(spec)}",
        )
    try:
        return diffusers.AutoPipelineForText2Image.from_pretrained(
            str(folder), local_files_only=True, **kwargs
        )
    except Exception as exc:  # any library error becomes one clear message
        raise load_failure(spec, cause_of(exc), fix_broken(spec)) from exc


def _load_repo(spec: ModelSpec, kwargs: dict[str, Any], offline: bool) -> DiffusionPipeline:
    import diffusers

    repo = str(spec.repo)
    auto = diffusers.AutoPipelineForText2Image
    if catalog.hub_cached(repo):
        try:
            return auto.from_pretrained(repo, local_files_only=True, **kwargs)
        except Exception as exc:
            if offline:
                raise unavailable(
                    spec,
                    "it is only partly in the Hugging Face cache and the hub is offline",
                    f"{repo!r} is only partly in the local Hugging Face cache and there is no "
                    f"network ({cause_of(exc)})",
                    fix_download(spec),
                ) from exc
            log.info("model %r: cached copy incomplete (%s); downloading", spec.name, exc)
    elif offline:
        raise unavailable(
            spec,
            "it is not in the Hugging Face cache and the hub is offline (HF_HUB_OFFLINE)",
            f"{repo!r} is not in the local Hugging Face cache and there is no network",
            fix_download(spec),
        )
    # What no retry mends (no hub here, no such repo, gated, no token) fails at once, in one
    # line: a bounded probe first, then the pipeline's index alone, before any weights.
    if not hub_reachable():
        raise unavailable(spec, UNREACHABLE, f"{UNREACHABLE} ({hub_endpoint()})",
                           fix_download(spec))
    try:
        from huggingface_hub import hf_hub_download

        hf_hub_download(repo, "model_index.json")
        return auto.from_pretrained(repo, **kwargs)
    except Exception as exc:
        why = hub_refusal(exc)
        if why is not None:
            raise unavailable(spec, why, f"{repo!r}: {why} ({cause_of(exc)})",
                               fix_download(spec)) from exc
        raise load_failure(
            spec,
            f"{repo!r} could not be downloaded from the Hugging Face hub ({cause_of(exc)})",
            fix_download(spec),
        ) from exc


def hub_refusal(exc: BaseException) -> str | None:
    """Why a download failed for good (the repo is not there, gated, refused without a token, or
    the hub does not answer), read from ``exc`` and the errors it came from (Diffusers wraps the
    hub's own in an OSError); None for a failure another try may not meet."""
    from huggingface_hub import errors as hub

    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, hub.GatedRepoError):
            return ("it is gated on the Hugging Face hub: accept its terms there and set "
                    "HF_TOKEN to a token of that account")
        if isinstance(cause, hub.RepositoryNotFoundError | hub.RevisionNotFoundError):
            return ("the Hugging Face hub has no such repo (or it is private: set HF_TOKEN to a "
                    "token that may read it)")
        if isinstance(cause, hub.OfflineModeIsEnabled | hub.LocalEntryNotFoundError):
            return UNREACHABLE
        if isinstance(cause, hub.EntryNotFoundError):
            return ("its Hugging Face repo lacks a file a Diffusers pipeline needs "
                    "(model_index.json or the weights of its variant)")
        status = getattr(getattr(cause, "response", None), "status_code", None)
        if isinstance(cause, hub.HfHubHTTPError) and status in (401, 403):
            return ("the Hugging Face hub refused it without a token that may read it "
                    f"(HTTP {status}): set HF_TOKEN")
        if isinstance(cause, ConnectionError) or _no_connection(cause):
            return UNREACHABLE
        cause = cause.__cause__ or cause.__context__
    return None


def _no_connection(exc: BaseException) -> bool:
    """A network error of httpx, its fork httpx2 (huggingface_hub's) or requests: no answer."""
    return any(
        c.__module__.split(".")[0] in ("httpx", "httpx2", "requests")
        and c.__name__ in ("NetworkError", "TimeoutException", "ConnectionError")
        for c in type(exc).__mro__
    )


def _load_single_file(spec: ModelSpec, kwargs: dict[str, Any], offline: bool) -> DiffusionPipeline:
    import diffusers

    path = Path(str(spec.file))
    if not path.is_file():
        raise unavailable(spec, "its checkpoint file does not exist",
                           f"file {path} does not exist", fix_location(spec))
    cls = (
        diffusers.StableDiffusionXLPipeline
        if spec.family.is_xl
        else diffusers.StableDiffusionPipeline
    )
    extra = {"config": spec.config} if spec.config else {}
    # A single file has no variants; the file is what it is.
    kwargs = {k: v for k, v in kwargs.items() if k != "variant"}
    try:
        return cls.from_single_file(str(path), local_files_only=offline, **extra, **kwargs)
    except Exception as exc:
        fix = fix_broken(spec)
        if offline and not spec.config and "config" in str(exc).lower():
            # Offline, Diffusers cannot fetch the component configs a checkpoint lacks.
            fix = (
                "Offline, a single-file checkpoint also needs its component configs: set "
                f"config = a Diffusers folder of the same family {where_to_set(spec)}, "
                f"or {lower_first(fix)}"
            )
        raise load_failure(spec, f"{path.name}: {cause_of(exc)}", fix) from exc


def derive_pipeline(t2i: DiffusionPipeline, kind: JobKind) -> DiffusionPipeline:
    """The pipeline for ``kind`` sharing ``t2i``'s weights (no copy, no reload).

    txt2img returns ``t2i`` itself; img2img, variation and upscale (both img2img on a given
    image) get the image-to-image sibling; inpaint gets the inpainting one.
    """
    import diffusers

    if kind is JobKind.txt2img:
        return t2i
    if kind in (JobKind.img2img, JobKind.variation, JobKind.upscale):
        sibling = diffusers.AutoPipelineForImage2Image.from_pipe(t2i)
    elif kind is JobKind.inpaint:
        sibling = diffusers.AutoPipelineForInpainting.from_pipe(t2i)
    else:
        raise InvalidRequest(f"no pipeline for job kind {kind!r}")
    sibling.set_progress_bar_config(disable=True)
    return sibling
