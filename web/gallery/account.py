"""The gallery's account page: credits (today's and each pack's expiry), the tier and until
when it is paid, and what the account bought (packs, subscriptions, refunds)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from sqlmodel import Session

from storage import accounts, ledger, purchases
from web.app import get_ctx
from web.context import WebContext
from web.gallery.common import PageRoute, page
from web.session import current_account

router = APIRouter(include_in_schema=False, route_class=PageRoute)
Ctx = Annotated[WebContext, Depends(get_ctx)]
Account = Annotated[int, Depends(current_account)]


@router.get("/gallery/account")
async def account_page(request: Request, ctx: Ctx, account_id: Account) -> Response:
    """Balance, tier and purchases of the signed-in account."""
    now = ctx.now()

    def read(s: Session) -> dict[str, Any]:
        found = accounts.get_account(session=s, account_id=account_id)
        return {
            "tier": found.tier,
            "balance": ledger.peek_balance(
                session=s, account_id=account_id, now=now, tiers=ctx.settings.tiers
            ),
            "subscription": purchases.active_subscription(
                session=s, account_id=account_id, now=now
            ),
            "purchases": purchases.list_purchases(session=s, account_id=account_id),
        }

    return page(request, ctx, "account.html", **await ctx.store(read, read_only=True))
