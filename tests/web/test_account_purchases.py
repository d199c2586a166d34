"""What an account bought, on the web: the API's ``GET /api/v1/account`` and the gallery's
account page show the balance, the tier (and until when it is paid), purchases and expiry."""

from __future__ import annotations

from datetime import timedelta

from storage import apikeys, purchases
from storage.db import transaction
from tests.web.conftest import Web
from tests.web.helpers import gallery_link, make_person


def _buy(web: Web, account_id: int) -> None:
    now = web.clock()
    with transaction(web.sessions) as s:
        purchases.record_pack(
            session=s, account_id=account_id, platform="telegram", platform_user_id="1",
            charge_id="stars-9", product="small", credits=100,
            expires_at=now + timedelta(days=90), now=now,
        )
        purchases.record_subscription(
            session=s, account_id=account_id, platform="discord", platform_user_id="2",
            charge_id="ent-9", product="subscription", tier="supporter",
            period_end=now + timedelta(days=30), known_tiers=web.settings.tiers, now=now,
        )


async def test_api_account_shows_tier_until_and_purchases(web: Web) -> None:
    me = make_person(web.sessions)
    with transaction(web.sessions) as s:
        key = apikeys.create_api_key(session=s, identity_id=me.identity_id).key
    auth = {"Authorization": f"Bearer {key}"}
    before = (await web.http.get("/api/v1/account", headers=auth)).json()
    assert before["purchases"] == [] and before["tier_until"] is None
    _buy(web, me.account_id)
    got = (await web.http.get("/api/v1/account", headers=auth)).json()
    assert got["tier"] == "supporter" and got["tier_until"] is not None
    assert got["balance"]["total"] == 100 + web.settings.tier("supporter").daily_allowance
    assert {(p["kind"], p["platform"], p["credits"], p["status"]) for p in got["purchases"]} == {
        ("pack", "telegram", 100, "paid"), ("subscription", "discord", 0, "paid")
    }
    pack = next(p for p in got["purchases"] if p["kind"] == "pack")
    assert pack["expires_at"].startswith((web.clock() + timedelta(days=90)).date().isoformat())


async def test_gallery_account_page_lists_purchases_and_expiry(web: Web) -> None:
    me = make_person(web.sessions)
    link = gallery_link(web.key, me.account_id, now=web.clock(), ttl=timedelta(days=1))
    assert (await web.http.get(link)).status_code == 303
    empty = await web.http.get("/gallery/account")
    assert empty.status_code == 200 and 'id="no-purchases"' in empty.text
    assert 'href="/gallery/account"' in (await web.http.get("/gallery")).text
    _buy(web, me.account_id)
    page = (await web.http.get("/gallery/account")).text
    expiry = (web.clock() + timedelta(days=90)).date().isoformat()
    assert "Tier: <strong>supporter</strong>, paid until" in page
    assert f"100 credits, expire {expiry}" in page
    assert "pack small" in page and "subscription subscription" in page
