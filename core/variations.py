"""Variations of one image of an earlier job, written once for every front end: the chat's V
buttons (``bots.common.requests``) and the gallery's "variations" (``web.gallery.make``)."""

from __future__ import annotations

from typing import Any

from core.request import GenerationRequest, JobKind, build_request

# A variation repaints this much of the chosen image: recognisably the same picture, changed.
VARIATION_STRENGTH = 0.6


def variation(
    request: GenerationRequest,
    png: bytes,
    width: int,
    height: int,
    styles: tuple[str, ...],
    *,
    count: int | None = None,
) -> GenerationRequest:
    """New takes on one image (``png``, ``width`` x ``height``, made in ``styles``) of the job
    that asked ``request``: its picture repainted with the job's prompt at a new seed.
    ``count``: how many (None keeps the job's). A validated copy: InvalidRequest names a field
    the copy cannot have."""
    update: dict[str, Any] = {
        "kind": JobKind.variation,
        "init_image": png,
        "mask": None,
        "width": width,
        "height": height,
        "styles": styles,
        "strength": VARIATION_STRENGTH,
        "seed": None,
    }
    if count is not None:
        update["count"] = count
    return build_request(**{**dict(request), **update})
