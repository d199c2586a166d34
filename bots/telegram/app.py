"""``build_application()``: the python-telegram-bot Application with every handler registered,
the delivery loop started and stopped with it, and flood control on every call."""

from __future__ import annotations

import logging
from typing import Any

from telegram.error import TelegramError
from telegram.ext import (
    Application,
    ApplicationBuilder,
    BaseRateLimiter,
    CallbackQueryHandler,
    CommandHandler,
    MessageHandler,
    PreCheckoutQueryHandler,
    filters,
)

from bots.common import jobs, purchases
from bots.common.core import ChatCore
from bots.common.delivery import DeliveryLoop
from bots.common.logs import hide_in_logs
from bots.common.progress import DEFAULT_INTERVAL_S, ProgressEditor
from bots.common.state import BotState
from bots.telegram.handlers import buttons, buy, commands, errors, imagine
from bots.telegram.menu import COMMANDS
from bots.telegram.port import PHOTO_MAX_BYTES, PLATFORM, TelegramPort
from bots.telegram.ratelimit import FloodLimiter
from bots.telegram.services import KEY
from bots.telegram.watch import REQUEST_KEY, polling_request
from cluster.broker import Broker
from cluster.client import Client
from cluster.events import JobEvent
from cluster.purchases import PurchaseService
from core.errors import ConfigError
from core.flags import command_limit
from core.settings import Settings
from core.shop import load_shop
from core.styles import StyleRegistry

log = logging.getLogger(__name__)

_UNSUPPORTED = (
    filters.Sticker.ALL
    | filters.VOICE
    | filters.AUDIO
    | filters.VIDEO
    | filters.VIDEO_NOTE
    | filters.ANIMATION
    | filters.Document.ALL
    | filters.LOCATION
    | filters.CONTACT
    | filters.POLL
)


class AtelierApplication(Application):  # type: ignore[type-arg]
    """Starts the delivery loop with the Application and stops it first, in polling, webhook
    and test set-ups alike (``post_init`` only runs under ``run_polling``)."""

    async def initialize(self) -> None:
        await super().initialize()
        try:
            await self.bot.set_my_commands(COMMANDS)
        except TelegramError as exc:
            log.warning("could not set the command list: %s", exc)

    async def start(self) -> None:
        limiter = self.bot.rate_limiter
        if isinstance(limiter, FloodLimiter):
            limiter.open()
        await super().start()
        jobs.start(self.bot_data[KEY])
        core: ChatCore = self.bot_data[KEY]
        core.spawn(purchases.lapse_loop(self.bot_data[buy.PURCHASES]), "subscription-lapse")

    async def stop(self) -> None:
        core: ChatCore = self.bot_data[KEY]
        core.stop_reading()
        # Calls waiting out flood control give up now (nothing of theirs was sent); a delivery
        # in the middle of sending finishes. Unacked deliveries stay pending for the next start.
        limiter = self.bot.rate_limiter
        if isinstance(limiter, FloodLimiter):
            limiter.close()
        await core.stop()
        await super().stop()


def build_application(
    settings: Settings,
    client: Client,
    broker: Broker,
    *,
    state: BotState,
    styles: StyleRegistry | None = None,
    consumer: str = "telegram-bot",
    progress_interval_s: float = DEFAULT_INTERVAL_S,
    rate_limiter: BaseRateLimiter[Any] | None = None,
    concurrent_updates: int = 64,
    startup_claim_idle_ms: int = 0,
    photo_max_bytes: int = PHOTO_MAX_BYTES,
) -> Application:  # type: ignore[type-arg]
    """The bot, ready to start (``bots.telegram.run.start_bot`` does); ``state`` stays the
    caller's to close. It consumes the Telegram delivery stream as ``consumer``."""
    if settings.telegram_token is None:
        raise ConfigError("ATELIER_TELEGRAM_TOKEN is required to run the Telegram bot")
    token = settings.telegram_token.get_secret_value()
    hide_in_logs(token)
    polling = polling_request()
    app = (
        ApplicationBuilder()
        .application_class(AtelierApplication)
        .token(token)
        .base_url(settings.telegram_api_base_url)
        .base_file_url(settings.telegram_file_base_url)
        .rate_limiter(rate_limiter or FloodLimiter())
        # Each update waits on the network and the store: handle many at once.
        .concurrent_updates(concurrent_updates)
        .connection_pool_size(max(8, concurrent_updates))
        .pool_timeout(30.0)
        .get_updates_request(polling)  # watched (bots.telegram.watch)
        .build()
    )

    core = ChatCore(
        settings=settings,
        client=client,
        state=state,
        port=TelegramPort(app.bot, photo_max_bytes=photo_max_bytes),
        editor=ProgressEditor(progress_interval_s),
        styles=styles or client.styles,
    )

    async def handle(event: JobEvent) -> None:
        await jobs.deliver(core, event)

    core.delivery = DeliveryLoop(
        broker,
        PLATFORM,
        consumer,
        handle,
        state,
        startup_claim_idle_ms=startup_claim_idle_ms,
        mark_delivered=client.mark_delivered,
    )
    app.bot_data[KEY] = core
    app.bot_data[REQUEST_KEY] = polling
    app.bot_data[buy.PURCHASES] = PurchaseService(settings, client.sessions, load_shop(settings))
    register_handlers(app)
    return app


def register_handlers(app: Application) -> None:  # type: ignore[type-arg]
    """Every handler, in match order (the first match in a group wins)."""
    new = filters.UpdateType.MESSAGE  # edits of old messages make no new jobs
    private = filters.ChatType.PRIVATE
    # First of all (group -1): a text too long to be a command, refused unread.
    limit = command_limit(app.bot_data[KEY].settings.limits)
    app.add_handler(MessageHandler(imagine.TooLong(limit), imagine.too_long), group=-1)
    for name, callback in (
        ("start", commands.start),
        ("help", commands.help_command),
        ("imagine", imagine.imagine),
        ("grid", imagine.grid),
        ("styles", commands.styles),
        ("credits", commands.credits),
        ("gallery", commands.gallery),
        ("apikey", commands.apikey),
        ("history", commands.history),
        ("cancel", commands.cancel),
        ("link", commands.link),
        ("settings", commands.settings),
        ("buy", buy.buy),
        ("refund", buy.refund),
    ):
        app.add_handler(CommandHandler(name, callback, filters=new))
    app.add_handler(CallbackQueryHandler(buttons.on_button))
    app.add_handler(PreCheckoutQueryHandler(buy.pre_checkout))
    app.add_handler(MessageHandler(filters.SUCCESSFUL_PAYMENT, buy.paid))
    app.add_handler(MessageHandler(filters.StatusUpdate.REFUNDED_PAYMENT, buy.refunded))
    app.add_handler(MessageHandler(new & (filters.PHOTO | filters.Document.IMAGE), imagine.photo))
    app.add_handler(MessageHandler(new & private & filters.COMMAND, commands.unknown))
    app.add_handler(MessageHandler(new & private & filters.TEXT, imagine.prompt_text))
    app.add_handler(MessageHandler(new & private & _UNSUPPORTED, imagine.unsupported))
    app.add_error_handler(errors.on_error)
