"""``GET /api/v1/account``: what an API key's owner may do now: the balance, the tier and its
limits (daily allowance, jobs at a time, largest side), the jobs in flight, and what the
account bought (packs and subscriptions, with their expiry)."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field
from sqlmodel import Session

from storage import accounts, ledger, purchases
from storage import jobs as job_repo
from storage.ledger import PackCredits
from web.api.common import ApiRoute, Caller, caller
from web.app import get_ctx
from web.context import WebContext
from web.errors import ERROR_RESPONSES

router = APIRouter(
    prefix="/api/v1", tags=["api v1"], route_class=ApiRoute, responses=ERROR_RESPONSES
)


class BalanceOut(BaseModel):
    total: int = Field(description="credits that can be spent now")
    daily_left: int
    packs: list[PackCredits] = Field(description="bought or granted credits, soonest-expiring "
                                                 "first")
    next_reset: datetime = Field(description="when the daily allowance is granted again (UTC)")


class LimitsOut(BaseModel):
    daily_allowance: int = Field(description="free credits granted each UTC day")
    concurrency: int = Field(description="jobs queued or running at a time; one more gets "
                                         "429 too_many_jobs with Retry-After")
    max_side: int = Field(description="the largest width or height, in pixels")
    max_steps: int
    max_count: int = Field(description="images in one job")


class PurchaseOut(BaseModel):
    kind: str = Field(description="pack or subscription")
    product: str
    platform: str = Field(description="where it was paid: telegram (Stars) or discord (SKU)")
    credits: int
    status: str = Field(description="paid, refunded or ended (a subscription past its period)")
    bought_at: datetime
    expires_at: datetime | None = Field(description="a pack's expiry or a subscription's "
                                                    "period end; null: never")
    taken_back: int = Field(description="credits a refund took back")
    owed: int = Field(description="credits already spent when it was refunded")


class AccountOut(BaseModel):
    account_id: int
    tier: str
    tier_until: datetime | None = Field(
        default=None, description="when the paid subscription's tier ends; null: not paid for")
    balance: BalanceOut
    limits: LimitsOut
    jobs_in_flight: int = Field(description="the account's jobs queued or running now")
    purchases: list[PurchaseOut] = Field(default_factory=list, description="newest first")


@router.get("/account", response_model=AccountOut)
async def account(who: Caller = Depends(caller), ctx: WebContext = Depends(get_ctx)) -> AccountOut:
    """The key's account: balance, tier, its limits and the jobs in flight."""
    settings, now = ctx.settings, ctx.now()

    def read(session: Session) -> AccountOut:
        found = accounts.get_account(session=session, account_id=who.key.account_id)
        tier = settings.tier(found.tier)
        bal = ledger.peek_balance(
            session=session, account_id=found.id, now=now, tiers=settings.tiers
        )
        sub = purchases.active_subscription(session=session, account_id=found.id, now=now)
        bought = purchases.list_purchases(session=session, account_id=found.id)
        return AccountOut(
            account_id=found.id,
            tier=found.tier,
            tier_until=None if sub is None else sub.expires_at,
            purchases=[
                PurchaseOut(
                    kind=p.kind.value, product=p.product, platform=p.platform,
                    credits=p.credits, status=p.status.value, bought_at=p.created_at,
                    expires_at=p.expires_at, taken_back=p.clawed_back, owed=p.owed,
                )
                for p in bought
            ],
            balance=BalanceOut(total=bal.total, daily_left=bal.daily_left, packs=bal.packs,
                               next_reset=bal.next_reset),
            limits=LimitsOut(
                daily_allowance=tier.daily_allowance, concurrency=tier.concurrency,
                max_side=min(tier.max_side, settings.limits.max_side),
                max_steps=settings.limits.max_steps, max_count=settings.limits.max_count,
            ),
            jobs_in_flight=job_repo.running_jobs_count(session=session, account_id=found.id),
        )

    return await ctx.store(read, read_only=True)
