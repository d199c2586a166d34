"""Buying on Discord: ``/buy`` shows a premium button per SKU of the shop; entitlements (the
gateway's create / update / delete events, and a pass over the application's entitlements each
time the bot connects, for those missed while it was down) credit once by their id; a
consumable is consumed after it is granted; a deleted entitlement is refunded (by its event,
or by the next pass when the bot missed it)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import aiohttp
import discord
from discord import app_commands
from discord.ext import commands

from bots.common import purchases as common
from bots.discord.port import PLATFORM
from core.jobs import Requester
from core.shop import Subscription
from storage.models import PurchaseKind, PurchaseStatus

if TYPE_CHECKING:
    from bots.discord.bot import AtelierBot

log = logging.getLogger(__name__)
LAST_SNOWFLAKE = (1 << 63) - 1


class Buy(commands.Cog):
    def __init__(self, bot: AtelierBot) -> None:
        self.bot = bot

    async def cog_load(self) -> None:
        self.bot.core.spawn(common.lapse_loop(self.bot.purchases), "subscription-lapse")

    @app_commands.command(name="buy", description="Buy credit packs or a subscription")
    async def buy(self, interaction: discord.Interaction[Any]) -> None:
        """The offers, with a premium button for each SKU (Discord runs the checkout)."""
        shop = self.bot.purchases.shop
        view = discord.ui.View(timeout=None)
        skus = self._skus()
        for sku in skus:
            view.add_item(discord.ui.Button(style=discord.ButtonStyle.premium, sku_id=int(sku)))
        text = common.offer_text(shop, self.bot.settings, platform=PLATFORM)
        if skus:
            await interaction.response.send_message(text, view=view, ephemeral=True)
        else:
            await interaction.response.send_message(text, ephemeral=True)

    @commands.Cog.listener()
    async def on_ready(self) -> None:
        """Connected (first start or a reconnect): credit what was bought meanwhile, in a task
        of the core (a stop cancels it; the next connect passes again)."""
        if self._skus():
            self.bot.core.spawn(self._reconcile_once(), "entitlements-reconcile")

    async def _reconcile_once(self) -> None:
        try:
            await self.reconcile()
        except (discord.HTTPException, OSError) as exc:
            log.warning("could not list the Discord entitlements (next connect tries again): %s",
                        exc)
        except Exception:  # a task's error would otherwise pass unseen
            log.exception("the pass over the Discord entitlements failed (next connect tries "
                          "again)")

    @commands.Cog.listener()
    async def on_entitlement_create(self, entitlement: discord.Entitlement) -> None:
        await self.grant(entitlement)

    @commands.Cog.listener()
    async def on_entitlement_update(self, entitlement: discord.Entitlement) -> None:
        await self.grant(entitlement)  # a subscription renewed or ending: its period end moves

    @commands.Cog.listener()
    async def on_entitlement_delete(self, entitlement: discord.Entitlement) -> None:
        await self.take_back(entitlement)

    async def take_back(self, entitlement: discord.Entitlement) -> None:
        """Refunded (or a test entitlement removed): take back what is left, once. A delete
        that overtakes its create (events reordered) is recorded, so the create credits
        nothing when it comes."""
        key = f"{PLATFORM}:{entitlement.id}"
        offer = self.bot.purchases.shop.by_sku(str(entitlement.sku_id))
        payer = None if entitlement.user_id is None else Requester(
            platform=PLATFORM, platform_user_id=str(entitlement.user_id)
        )
        kind = PurchaseKind.subscription if isinstance(offer, Subscription) else PurchaseKind.pack
        try:
            done = await self.bot.purchases.refunded(
                key, payer=payer, kind=kind, product=offer.name if offer else "unknown"
            )
        except Exception:
            log.exception("could not take back the deleted entitlement %s", key)
            return
        if done.created:
            log.info("discord entitlement %s refunded: took back %d", key,
                     done.purchase.clawed_back)

    async def reconcile(self) -> int:
        """Every entitlement of the application: a live one credited once, a deleted one taken
        back once; returns those seen."""
        seen = 0
        skus = [discord.Object(id=int(sku)) for sku in self._skus()]
        # Deleted ones too: a refund made while the bot was away sent its delete event to
        # nobody; taking it back here is as idempotent as granting. Paged newest first from
        # the largest snowflake: discord.py 2.7 leaves exclude_deleted out of the request
        # when it pages oldest first (no ``before``), and Discord then hides deleted ones.
        async for entitlement in self.bot.entitlements(
            limit=None, before=discord.Object(id=LAST_SNOWFLAKE), skus=skus,
            exclude_ended=True, exclude_deleted=False,
        ):
            if entitlement.deleted:
                await self.take_back(entitlement)
            else:
                await self.grant(entitlement)
            seen += 1
        log.info("reconciled %d Discord entitlements", seen)
        return seen

    def _skus(self) -> list[str]:
        shop = self.bot.purchases.shop
        skus = [p.discord_sku for p in shop.packs.values() if p.discord_sku]
        if shop.subscription is not None and shop.subscription.discord_sku:
            skus.append(shop.subscription.discord_sku)
        return skus

    async def grant(self, entitlement: discord.Entitlement) -> None:
        """Credit one entitlement (once by its id), then consume it if it is a consumable."""
        if entitlement.user_id is None or entitlement.deleted:
            return  # a server's subscription, or a refunded one: nothing to credit
        try:
            paid = await common.entitled(
                self.bot.purchases,
                platform=PLATFORM,
                user_id=str(entitlement.user_id),
                entitlement_id=str(entitlement.id),
                sku_id=str(entitlement.sku_id),
                ends_at=entitlement.ends_at,
            )
        except Exception:
            log.exception("could not credit entitlement %s", entitlement.id)
            return
        if paid is None:
            log.warning("entitlement %s is for SKU %s, not in the shop", entitlement.id,
                        entitlement.sku_id)
            return
        if paid.purchase.status == PurchaseStatus.refunded:
            return  # deleted (refunded) before this event arrived: nothing to consume
        if paid.purchase.kind == "pack" and not entitlement.consumed:
            try:
                await entitlement.consume()
            except (discord.HTTPException, aiohttp.ClientError, OSError, RuntimeError) as exc:
                # Credited already; the next reconcile consumes it (credited once by its id).
                # A connection error or RuntimeError: the bot is stopping, its HTTP session
                # closed under the call.
                log.warning("could not consume entitlement %s: %s", entitlement.id, exc)
        if paid.created:
            log.info("discord entitlement %s of %s credited", entitlement.id, entitlement.user_id)
