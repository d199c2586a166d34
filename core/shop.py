"""The shop's catalogue: credit packs and a subscription, sold for Telegram Stars and as
Discord SKUs. Read from ``shop.toml`` (``ATELIER_SHOP_FILE``, default ``{data_dir}/shop.toml``);
no file: nothing is for sale."""

from __future__ import annotations

import re
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from core.errors import ConfigError
from core.settings import Settings

# Telegram Stars subscriptions have one period: 30 days.
SUBSCRIPTION_PERIOD_S = 2_592_000
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


class Pack(BaseModel):
    """Credits bought once: ``credits`` that expire ``lifetime_days`` after the purchase."""

    name: str
    title: str
    credits: int = Field(ge=1)
    lifetime_days: int | None = Field(default=365, ge=1)  # None: never expires
    stars: int | None = Field(default=None, ge=1, le=10_000)  # Telegram price; None: not sold
    discord_sku: str | None = None  # Discord consumable SKU id; None: not sold there

    @property
    def lifetime(self) -> timedelta | None:
        return None if self.lifetime_days is None else timedelta(days=self.lifetime_days)


class Subscription(BaseModel):
    """A 30-day subscription that puts the account on ``tier`` while it is paid."""

    name: str = "subscription"
    title: str
    tier: str
    stars: int | None = Field(default=None, ge=1, le=10_000)  # per 30 days
    discord_sku: str | None = None


class Shop(BaseModel):
    packs: dict[str, Pack] = Field(default_factory=dict)
    subscription: Subscription | None = None
    # What happens to credits already spent from a refunded pack: recorded as owed (the next
    # purchase does not pay it back; an operator sees it) or written off.
    refund_policy: Literal["owed", "write_off"] = "owed"

    @model_validator(mode="after")
    def _unique_skus(self) -> Shop:
        skus = [p.discord_sku for p in self.packs.values() if p.discord_sku]
        if self.subscription is not None and self.subscription.discord_sku:
            skus.append(self.subscription.discord_sku)
        if len(skus) != len(set(skus)):
            raise ValueError(f"a Discord SKU id is used twice: {sorted(skus)}")
        return self

    def pack(self, name: str) -> Pack | None:
        return self.packs.get(name)

    def by_sku(self, sku_id: str) -> Pack | Subscription | None:
        for pack in self.packs.values():
            if pack.discord_sku == sku_id:
                return pack
        sub = self.subscription
        return sub if sub is not None and sub.discord_sku == sku_id else None

    def for_stars(self) -> list[Pack]:
        return [p for p in self.packs.values() if p.stars is not None]


def load_shop(settings: Settings) -> Shop:
    """The catalogue of ``settings`` (empty without a file); ConfigError naming what is wrong."""
    path: Path | None = settings.shop_file
    explicit = path is not None
    path = path or settings.data_dir / "shop.toml"
    if not path.exists():
        if explicit:
            raise ConfigError(f"ATELIER_SHOP_FILE {path} does not exist")
        return Shop()
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"shop file {path} is not valid TOML: {exc}") from None
    return parse_shop(raw, settings, source=str(path))


def parse_shop(raw: dict[str, object], settings: Settings, *, source: str = "shop") -> Shop:
    packs = raw.get("packs", {})
    if not isinstance(packs, dict):
        raise ConfigError(f"{source}: [packs] must be a table of packs, got {packs!r}")
    for name in packs:
        if not _NAME.match(name):
            raise ConfigError(
                f"{source}: pack name {name!r} must be 1-32 of a-z, 0-9, _ and -"
            )
    try:
        shop = Shop.model_validate(
            {
                **raw,
                "packs": {
                    name: {"name": name, "title": f"{fields.get('credits')} credits", **fields}
                    for name, fields in packs.items()
                    if isinstance(fields, dict)
                },
            }
        )
    except ValidationError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    sub = shop.subscription
    if sub is not None and sub.tier not in settings.tiers:
        raise ConfigError(
            f"{source}: subscription tier {sub.tier!r} is not one of the tiers "
            f"{sorted(settings.tiers)} (ATELIER_TIERS)"
        )
    return shop
