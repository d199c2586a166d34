"""redact_url: passwords, secret query parameters and tokens in paths never reach a screen."""

from __future__ import annotations

import pytest

from core.redact import redact_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://atelier:s3cret@db:5432/atelier", "postgresql://atelier:***@db:5432/atelier"),
        ("redis://:s3cret@cache:6379/0", "redis://:***@cache:6379/0"),
        ("redis://bob@cache/1", "redis://bob@cache/1"),  # a user name alone is no secret
        ("redis://cache:6379", "redis://cache:6379"),
        ("sqlite:////home/me/.local/share/atelier/atelier.db",
         "sqlite:////home/me/.local/share/atelier/atelier.db"),
        ("unix:///run/redis.sock?password=s3cret&db=2", "unix:///run/redis.sock?password=***&db=2"),
        ("postgresql://db/atelier?user=me&Password=s3cret", "postgresql://db/atelier?user=me&Password=***"),
        ("https://api.telegram.org/bot123456:AA-s3cret_x/getMe",
         "https://api.telegram.org/bot***/getMe"),
        ("https://api.telegram.org/file/bot123456:AAs3cret/photos/file_1.jpg",
         "https://api.telegram.org/file/bot***/photos/file_1.jpg"),
        ("https://discord.com/api/webhooks/42/s3cret-token", "https://discord.com/api/webhooks/42/***"),
        ("https://example.org/cb?token=s3cret#top", "https://example.org/cb?token=***#top"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected
    assert "s3cret" not in redact_url(url)


def test_redact_url_keeps_user_and_password_apart() -> None:
    # A password holding '@' or ':' is still cut at the host's '@'.
    assert redact_url("redis://u:p@ss:w0rd@host:1/0") == "redis://u:***@host:1/0"


def test_unparseable_url_is_not_echoed() -> None:
    assert redact_url("redis://[s3cret") == "<unparseable URL>"
