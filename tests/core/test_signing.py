"""Signed links: round trip, expiry, tampering, purpose binding."""

from datetime import UTC, datetime, timedelta

import pytest

from core.errors import Forbidden
from core.signing import sign, verify

KEY = b"k" * 48
NOW = datetime(2026, 1, 1, 12, tzinfo=UTC)


def test_round_trip() -> None:
    tok = sign(KEY, subject="acc-1", purpose="gallery", now=NOW, ttl=timedelta(hours=1))
    assert verify(KEY, tok, purpose="gallery", now=NOW + timedelta(minutes=59)) == "acc-1"


def test_expired() -> None:
    tok = sign(KEY, subject="acc-1", purpose="gallery", now=NOW, ttl=timedelta(hours=1))
    with pytest.raises(Forbidden, match="expired"):
        verify(KEY, tok, purpose="gallery", now=NOW + timedelta(hours=1, seconds=1))


@pytest.mark.parametrize("mutate", [
    lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),
    lambda t: "x" + t,
    lambda t: t.split(".")[0],
    lambda t: "",
])
def test_tampered(mutate) -> None:  # type: ignore[no-untyped-def]
    tok = sign(KEY, subject="acc-1", purpose="gallery", now=NOW, ttl=timedelta(hours=1))
    with pytest.raises(Forbidden):
        verify(KEY, mutate(tok), purpose="gallery", now=NOW)


def test_other_key_or_purpose_refused() -> None:
    tok = sign(KEY, subject="acc-1", purpose="gallery", now=NOW, ttl=timedelta(hours=1))
    with pytest.raises(Forbidden):
        verify(b"z" * 48, tok, purpose="gallery", now=NOW)
    with pytest.raises(Forbidden):
        verify(KEY, tok, purpose="download", now=NOW)
