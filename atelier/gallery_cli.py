"""``atelier gallery link IDENTITY``: a signed gallery link for someone without a chat bot."""

from __future__ import annotations

from datetime import UTC, datetime

import typer

from atelier.apikey_cli import _identity
from atelier.app import open_store
from atelier.wiring import console, fail, settings_or_exit
from core.errors import AtelierError, NotFound
from core.signing import duration_text, gallery_url

gallery_app = typer.Typer(help="The web gallery.", no_args_is_help=True)


@gallery_app.command("link")
def gallery_link(
    identity: str = typer.Argument(..., help="PLATFORM:USER whose gallery, e.g. telegram:12345"),
) -> None:
    """Print a signed link to the identity's gallery (its whole account's), as the bots'
    /gallery sends it; valid for ATELIER_GALLERY_LINK_TTL_S seconds."""
    from storage import accounts

    platform, user = _identity(identity)
    settings = settings_or_exit()
    try:
        with open_store(settings) as tx, tx() as session:
            try:
                acc = accounts.find_account(
                    session=session, platform=platform, platform_user_id=user
                )
            except NotFound:
                raise NotFound(
                    f"no account has the identity {platform}:{user} (it gets one with its "
                    f"first job, or with `atelier apikey create {platform}:{user}`)"
                ) from None
    except AtelierError as exc:
        raise fail(exc) from None
    url = gallery_url(settings, acc.id, now=datetime.now(UTC))
    valid = duration_text(settings.gallery_link_ttl_s)
    console.print(f"gallery of {platform}:{user} (account {acc.id}), valid {valid}:")
    console.print(url, markup=False, highlight=False, soft_wrap=True)
