"""Inline buttons: every press goes to ``bots.common.actions.on_press``; its answer is shown
as the callback answer (an alert for a refusal)."""

from __future__ import annotations

from telegram import Message, Update

from bots.common import actions
from bots.common.port import Press
from bots.telegram.services import Context, core_of, who_of

ANSWER_LIMIT = 200  # characters Telegram shows in a callback answer


async def on_button(update: Update, context: Context) -> None:
    """Answer a press on any of the bot's inline buttons."""
    query, who = update.callback_query, who_of(update)
    if query is None or who is None:
        return
    message = query.message if isinstance(query.message, Message) else None
    press = Press(
        who=who,
        data=query.data or "",
        press_id=query.id,
        message_id=str(message.message_id) if message is not None else None,
    )
    answer = await actions.on_press(core_of(context), press)
    text = answer.text[:ANSWER_LIMIT] if answer.text else None
    await query.answer(text, show_alert=answer.alert or None)
