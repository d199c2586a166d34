"""``atelier apikey create | list | revoke``: keys for the REST API and the A1111 API."""

from __future__ import annotations

from datetime import UTC, datetime

import typer
from rich.table import Table

from atelier.app import open_store
from atelier.wiring import console, fail, settings_or_exit
from core.errors import AtelierError

apikey_app = typer.Typer(
    help="API keys for /api/v1 and /sdapi/v1 (shown once, stored hashed).", no_args_is_help=True
)


def _identity(spec: str) -> tuple[str, str]:
    platform, sep, user = spec.partition(":")
    if not sep or not platform or not user:
        raise typer.BadParameter(f"expected PLATFORM:USER (e.g. telegram:12345), got {spec!r}")
    return platform.lower(), user


@apikey_app.command("create")
def apikey_create(
    identity: str = typer.Argument(..., help="PLATFORM:USER the key acts as, e.g. telegram:12345"),
    name: str = typer.Option("", help="a label to tell keys apart, e.g. sillytavern"),
) -> None:
    """Make a key for an identity (its account is created if new). The key is shown once."""
    from storage import accounts, apikeys

    platform, user = _identity(identity)
    settings = settings_or_exit()
    try:
        with open_store(settings) as tx, tx.begin() as session:
            acc = accounts.resolve_account(
                session=session, platform=platform, platform_user_id=user,
                default_tier=settings.default_tier,
            )
            if acc.identity is None:
                raise AtelierError(f"no identity for {platform}:{user}")
            made = apikeys.create_api_key(session=session, identity_id=acc.identity.id, name=name)
    except AtelierError as exc:
        raise fail(exc) from None
    console.print(f"API key for {platform}:{user} (account {acc.id}); it is not shown again:")
    # Plain print of the secret itself: no markup, so nothing in it is taken for a style.
    console.print(made.key, markup=False, highlight=False)


@apikey_app.command("list")
def apikey_list(
    identity: str = typer.Argument(..., help="PLATFORM:USER; lists its whole account's keys"),
) -> None:
    """List an account's keys: prefix, name, identity, created, last used, revoked."""
    from storage import accounts, apikeys

    platform, user = _identity(identity)
    settings = settings_or_exit()
    try:
        with open_store(settings) as tx, tx.begin() as session:
            acc = accounts.find_account(session=session, platform=platform, platform_user_id=user)
            keys = apikeys.list_api_keys(session=session, account_id=acc.id)
    except AtelierError as exc:
        raise fail(exc) from None
    table = Table("prefix", "name", "identity", "created", "last used", "revoked")
    for k in keys:
        table.add_row(
            k.prefix, k.name, f"{k.platform}:{k.platform_user_id}", _when(k.created_at),
            _when(k.last_used_at), _when(k.revoked_at),
        )
    console.print(table)


@apikey_app.command("revoke")
def apikey_revoke(
    prefix: str = typer.Argument(..., help="the key's prefix (atk_1234abcd) or the whole key"),
) -> None:
    """Revoke a key at once: the next request with it gets 401."""
    from storage import apikeys

    settings = settings_or_exit()
    try:
        with open_store(settings) as tx, tx.begin() as session:
            key = apikeys.revoke_api_key(session=session, prefix=prefix, now=datetime.now(UTC))
    except AtelierError as exc:
        raise fail(exc) from None
    console.print(f"revoked {key.prefix} ({key.platform}:{key.platform_user_id})")


def _when(at: datetime | None) -> str:
    return at.isoformat(timespec="seconds") if at else "-"
