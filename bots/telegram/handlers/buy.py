"""Buying with Telegram Stars: /buy sends an invoice per pack (currency XTR, no provider token),
pre-checkout is answered here at once, a successful payment credits once by its charge id,
/refund (operators) refunds a charge with refundStarPayment and takes the pack back, and a
refund made elsewhere (a refunded_payment message) takes it back too."""

from __future__ import annotations

import logging

from telegram import LabeledPrice, Update
from telegram.error import BadRequest, TelegramError

from bots.common import purchases as common
from bots.telegram.services import Context, core_of, reply_error
from cluster.purchases import PurchaseService
from core.errors import AtelierError, Conflict, InvalidRequest
from core.jobs import Requester
from core.shop import SUBSCRIPTION_PERIOD_S
from storage.models import PurchaseKind

log = logging.getLogger(__name__)

PURCHASES = "atelier.purchases"
STARS = "XTR"
SUB_PAYLOAD = "sub"


def purchases_of(context: Context) -> PurchaseService:
    return context.bot_data[PURCHASES]  # type: ignore[no-any-return]


def _requester(user_id: int, name: str | None = None) -> Requester:
    return Requester(platform="telegram", platform_user_id=str(user_id), display_name=name)


async def buy(update: Update, context: Context) -> None:
    """Offer the packs, an invoice each, and the subscription's link."""
    message, chat = update.effective_message, update.effective_chat
    if message is None or chat is None:
        return
    service = purchases_of(context)
    shop, settings = service.shop, core_of(context).settings
    await message.reply_text(common.offer_text(shop, settings, platform="telegram"))
    for pack in shop.for_stars():
        await context.bot.send_invoice(
            chat_id=chat.id,
            title=pack.title,
            description=common.pack_description(pack),
            payload=common.pack_payload(pack),
            provider_token="",
            currency=STARS,
            prices=[LabeledPrice(pack.title, pack.stars or 0)],
        )
    sub = shop.subscription
    if sub is not None and sub.stars:
        link = await context.bot.create_invoice_link(
            title=sub.title,
            description=common.subscription_description(shop, settings),
            payload=SUB_PAYLOAD,
            provider_token="",
            currency=STARS,
            prices=[LabeledPrice(sub.title, sub.stars)],
            subscription_period=SUBSCRIPTION_PERIOD_S,
        )
        await message.reply_text(f"Subscribe ({sub.stars} ⭐ a month): {link}")


async def pre_checkout(update: Update, context: Context) -> None:
    """Answer at once (Telegram waits 10 s): the pack is still on sale at that price and the
    payer's account is not blocked (refused with the operator's reason)."""
    query = update.pre_checkout_query
    if query is None:
        return
    service = purchases_of(context)
    try:
        if query.currency != STARS:
            raise InvalidRequest(f"only Stars are accepted, not {query.currency}")
        if query.invoice_payload == SUB_PAYLOAD:
            sub = service.shop.subscription
            if sub is None or sub.stars != query.total_amount:
                raise Conflict("this subscription is no longer on sale; see /buy")
            await service.check_account(_requester(query.from_user.id))
        else:
            pack = common.pack_of_payload(query.invoice_payload, service.shop)
            on_sale = await service.check(
                _requester(query.from_user.id), pack.name, stars=query.total_amount
            )
            if on_sale.credits != pack.credits:
                raise Conflict(f"the pack {pack.name!r} changed; see /buy")
    except AtelierError as exc:
        await query.answer(ok=False, error_message=exc.message)
        return
    await query.answer(ok=True)


async def paid(update: Update, context: Context) -> None:
    """Credit a successful payment (once per charge id) and say the balance now."""
    message, user = update.effective_message, update.effective_user
    if message is None or user is None or message.successful_payment is None:
        return
    payment = message.successful_payment
    service = purchases_of(context)
    requester = _requester(user.id, user.full_name)
    charge = payment.telegram_payment_charge_id
    if payment.invoice_payload == SUB_PAYLOAD or payment.is_recurring:
        done = await service.subscription_paid(
            requester, charge, period_end=payment.subscription_expiration_date
        )
    else:
        pack = common.pack_of_payload(payment.invoice_payload, service.shop)
        done = await service.pack_paid(requester, charge, pack)
    log.info("telegram payment %s of %s credited (new: %s)", charge, user.id, done.created)
    await message.reply_text(common.paid_text(done))


async def refunded(update: Update, context: Context) -> None:
    """A refund made outside /refund (Telegram support, another operator tool): Telegram
    sends a refunded_payment message (Bot API 7.10+). Take back what is left of that
    purchase once, and tell the person; a refund that beats its payment here is recorded,
    so the payment credits nothing when it arrives."""
    message, user = update.effective_message, update.effective_user
    if message is None or user is None or message.refunded_payment is None:
        return
    info = message.refunded_payment
    service = purchases_of(context)
    charge = info.telegram_payment_charge_id
    if info.invoice_payload == SUB_PAYLOAD:
        kind, product = PurchaseKind.subscription, "subscription"
    else:
        kind = PurchaseKind.pack
        try:
            product = common.pack_of_payload(info.invoice_payload, service.shop).name
        except InvalidRequest:
            product = "unknown"
    done = await service.refunded(
        f"telegram:{charge}", payer=_requester(user.id, user.full_name), kind=kind,
        product=product,
    )
    log.info("telegram refund of %s for %s taken back (new: %s)", charge, user.id, done.created)
    if done.created:  # a duplicate of the update has been answered already
        await message.reply_text(common.refunded_text(done))


async def refund(update: Update, context: Context) -> None:
    """Operators: /refund CHARGE_ID refunds the Stars and takes back what is left."""
    message, user = update.effective_message, update.effective_user
    if message is None or user is None:
        return
    core = core_of(context)
    if not common.is_operator(core.settings, "telegram", str(user.id)):
        await message.reply_text("Only operators can refund payments.")
        return
    if not context.args:
        await message.reply_text("Usage: /refund CHARGE_ID")
        return
    charge = context.args[0]
    service = purchases_of(context)
    try:
        bought = await service.get(f"telegram:{charge}")
        try:
            await context.bot.refund_star_payment(
                user_id=int(bought.platform_user_id), telegram_payment_charge_id=charge
            )
        except BadRequest as exc:
            # Refunded already (an earlier /refund whose bookkeeping failed): finish it.
            if "ALREADY_REFUNDED" not in str(exc).upper():
                raise
        done = await service.refund(bought.key)
    except AtelierError as exc:
        await reply_error(update, context, exc)
        return
    except TelegramError as exc:
        await message.reply_text(f"Telegram refused the refund of {charge}: {exc}")
        return
    await message.reply_text(common.refund_text(done))
