"""Secrets out of URLs before they are printed or logged: the one ``redact_url``."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit

MASK = "***"
# Query parameters that carry a secret (redis-py and libpq take ?password=, APIs ?token=...).
SECRET_PARAMS = frozenset(
    {"password", "pass", "pwd", "passwd", "token", "access_token", "secret", "api_key",
     "apikey", "key", "sig", "signature", "sslpassword"}
)
# Secrets that services put in the path: Telegram's /bot<id>:<token>/ (and /file/bot...),
# Discord's /webhooks/<id>/<token>.
_PATH_SECRETS = (
    (re.compile(r"(?<=/bot)\d+:[A-Za-z0-9_-]+"), MASK),
    (re.compile(r"(?<=/webhooks/)(\d+)/[A-Za-z0-9_.-]+"), r"\1/" + MASK),
)


def redact_url(url: str) -> str:
    """``url`` fit for logs and error messages: a password in the user part, secret query
    parameters and tokens in known paths replaced by ``***``; the rest (scheme, user, host,
    port, database) kept, since that is what a person needs to find the service."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, sep, _ = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{host}" if sep else f"{userinfo}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, MASK if k.lower() in SECRET_PARAMS else v) for k, v in pairs], safe="*"
        )
    path = parts.path
    for pattern, replacement in _PATH_SECRETS:
        path = pattern.sub(replacement, path)
    # Rebuilt by hand: urlunsplit drops an empty host's "//" (unix:///run/redis.sock).
    out = f"{parts.scheme}:" if parts.scheme else ""
    if url[len(out):].startswith("//"):
        out += "//" + netloc
    out += path
    if query:
        out += "?" + query
    if parts.fragment:
        out += "#" + parts.fragment
    return out
