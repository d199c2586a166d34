"""``GET /api/v1/account``: what an API key's owner may do now: the balance, the tier and its
limits (daily allowance, jobs at a time, largest side) and the jobs in flight."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field
from sqlmodel import Session

from storage import accounts, ledger
from storage import jobs as job_repo
from storage.ledger import PackCredits
from web.api.common import ApiRoute, Caller, caller, db
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


class AccountOut(BaseModel):
    account_id: int
    tier: str
    balance: BalanceOut
    limits: LimitsOut
    jobs_in_flight: int = Field(description="the account's jobs queued or running now")


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
        return AccountOut(
            account_id=found.id,
            tier=found.tier,
            balance=BalanceOut(total=bal.total, daily_left=bal.daily_left, packs=bal.packs,
                               next_reset=bal.next_reset),
            limits=LimitsOut(
                daily_allowance=tier.daily_allowance, concurrency=tier.concurrency,
                max_side=min(tier.max_side, settings.limits.max_side),
                max_steps=settings.limits.max_steps, max_count=settings.limits.max_count,
            ),
            jobs_in_flight=job_repo.running_jobs_count(session=session, account_id=found.id),
        )

    return await db(ctx, read, read_only=True)
