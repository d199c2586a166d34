"""The fake Discord's premium side: SKUs, entitlements (listed, consumed) and the
ENTITLEMENT_CREATE / UPDATE / DELETE gateway events, for the purchase tests."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from testing.discord import payloads as p

SUBSCRIPTION_SKU = 5  # SKU types: 2 durable, 3 consumable, 5 subscription
CONSUMABLE_SKU = 3
PURCHASE = 1  # entitlement types: 1 a purchase, 8 an application subscription
APPLICATION_SUBSCRIPTION = 8


class Premium:
    """Mixed into FakeDiscord: ``skus`` on sale, ``entitlements`` by id."""

    skus: dict[int, dict[str, Any]]
    entitlements: dict[int, dict[str, Any]]
    snowflake: p.Snowflakes
    dispatch: Callable[[str, dict[str, Any]], Awaitable[None]]

    def add_sku(self, sku_id: int, name: str, *, kind: int = CONSUMABLE_SKU) -> None:
        self.skus[sku_id] = {
            "id": str(sku_id), "type": kind, "application_id": str(p.APP_ID), "name": name,
            "slug": name.lower(), "flags": 4 if kind == CONSUMABLE_SKU else 128,
        }

    async def entitle(
        self, user_id: int, sku_id: int, *, ends_at: datetime | None = None,
        announce: bool = True,
    ) -> dict[str, Any]:
        """Someone bought ``sku_id``: a new entitlement, announced on the gateway unless the
        bot is not there to hear it (``announce=False``)."""
        sku = self.skus[sku_id]
        sub = sku["type"] == SUBSCRIPTION_SKU
        ent_id = self.snowflake()
        ent: dict[str, Any] = {
            "id": str(ent_id), "sku_id": str(sku_id),
            "application_id": str(p.APP_ID), "user_id": str(user_id),
            "type": APPLICATION_SUBSCRIPTION if sub else PURCHASE,
            "deleted": False, "consumed": False,
            "starts_at": None, "ends_at": ends_at.isoformat() if ends_at else None,
        }
        self.entitlements[ent_id] = ent
        if announce:
            await self.dispatch("ENTITLEMENT_CREATE", ent)
        return ent

    async def update_entitlement(self, ent_id: int, **changes: Any) -> None:
        ent = self.entitlements[ent_id]
        ent.update(changes)
        await self.dispatch("ENTITLEMENT_UPDATE", ent)

    async def delete_entitlement(self, ent_id: int) -> None:
        """A refund (or a removed test entitlement): deleted, and the event sent."""
        ent = self.entitlements[ent_id]
        ent["deleted"] = True
        await self.dispatch("ENTITLEMENT_DELETE", ent)

    async def _list_skus(self, call: Any, m: re.Match[str]) -> Any:
        return list(self.skus.values())

    async def _list_entitlements(self, call: Any, m: re.Match[str]) -> Any:
        query = call.query
        rows = sorted(self.entitlements.values(), key=lambda e: int(e["id"]))
        if query.get("exclude_deleted", "1") in ("1", "true"):
            rows = [e for e in rows if not e["deleted"]]
        if "sku_ids" in query:
            wanted = set(query["sku_ids"].split(","))
            rows = [e for e in rows if e["sku_id"] in wanted]
        if "user_id" in query:
            rows = [e for e in rows if e["user_id"] == query["user_id"]]
        if "before" in query:
            rows = [e for e in rows if int(e["id"]) < int(query["before"])]
        if "after" in query:
            rows = [e for e in rows if int(e["id"]) > int(query["after"])]
        limit = int(query.get("limit", 100))
        return rows[-limit:] if "after" not in query else rows[:limit]

    async def _consume(self, call: Any, m: re.Match[str]) -> Any:
        ent = self.entitlements[int(m["entitlement"])]
        ent["consumed"] = True
        return None
