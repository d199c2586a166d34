"""Signed links: round trip, expiry, tampering, purpose binding."""

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from core.errors import Forbidden
from core.settings import load_settings
from core.signing import GALLERY_PURPOSE, duration_text, gallery_url, sign, verify

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


def test_a_gallery_link_lasts_as_the_setting_says(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, _env_file=None, gallery_link_ttl_s=3 * 3600,
                             public_base_url="https://art.example.org/")
    url = gallery_url(settings, 42, now=NOW)
    base, _, token = url.rpartition("/g/")
    assert base == "https://art.example.org"
    key = settings.resolved_signing_key
    assert verify(key, token, purpose=GALLERY_PURPOSE, now=NOW + timedelta(hours=3)) == "42"
    with pytest.raises(Forbidden, match="expired"):
        verify(key, token, purpose=GALLERY_PURPOSE, now=NOW + timedelta(hours=3, seconds=1))
    assert [duration_text(s) for s in (7 * 86400, 86400, 3 * 3600, 60, 59)] == [
        "7 days", "1 day", "3 hours", "1 minute", "59 seconds"]
