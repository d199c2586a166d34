"""Whether the Hugging Face hub answers from here: one short, bounded HTTP probe of the
configured endpoint (HF_ENDPOINT, as huggingface_hub reads it), its answer kept for minutes, and
never a probe while HF_HUB_OFFLINE is set. Availability and loading both ask it, so a box that
cannot reach the hub neither offers nor tries a download."""

from __future__ import annotations

import logging
import threading
import time

import httpx

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 2.0
# How long an answer is kept: a box's network seldom changes, and availability is asked often
# (each worker's info(), each submit).
PROBE_TTL_S = 180.0
UNREACHABLE = "the Hugging Face hub cannot be reached from here"

_lock = threading.Lock()
_answers: dict[str, tuple[float, bool]] = {}  # endpoint -> (monotonic time asked, reachable)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_endpoint() -> str:
    """The hub's address as huggingface_hub reads it (HF_ENDPOINT, else huggingface.co)."""
    from huggingface_hub import constants

    return str(constants.ENDPOINT).rstrip("/")


def _probe(endpoint: str, timeout_s: float) -> bool:
    """True when ``endpoint`` answers HTTP at all (any status: it is there)."""
    try:
        with httpx.Client(timeout=timeout_s, follow_redirects=False) as client:
            client.head(f"{endpoint}/api/models", params={"limit": 1})
    except httpx.HTTPError as exc:
        log.warning("the Hugging Face hub at %s does not answer (%s): repo models that are not "
                    "in the local cache count as missing", endpoint, type(exc).__name__)
        return False
    return True


def hub_reachable(
    endpoint: str | None = None, *, ttl_s: float = PROBE_TTL_S,
    timeout_s: float = PROBE_TIMEOUT_S,
) -> bool:
    """Whether the hub answers from here: one probe of at most ``timeout_s`` per ``ttl_s``
    (callers meanwhile wait for it, then share it). Callers ask ``hub_offline`` first: with
    HF_HUB_OFFLINE set nothing should probe."""
    where = (endpoint or hub_endpoint()).rstrip("/")
    with _lock:
        known = _answers.get(where)
        if known is not None and time.monotonic() - known[0] < ttl_s:
            return known[1]
        reachable = _probe(where, timeout_s)
        _answers[where] = (time.monotonic(), reachable)
        return reachable


def forget_probes() -> None:
    """Drop every kept answer (the next question probes again)."""
    with _lock:
        _answers.clear()
