"""A fake Telegram Bot API server on 127.0.0.1 (aiohttp, from the dev extra) that the real
python-telegram-bot talks to in tests and benches: it long-polls updates, records every call
(uploads included) and can answer 429."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import BodyPartReader, web

from testing.net import free_port

BOT_ID = 900_000_001
BOT_USERNAME = "atelier_test_bot"
# Every admin right ChatMemberAdministrator requires, all granted.
_ADMIN_RIGHTS = (
    "can_be_edited",
    "can_manage_chat",
    "can_delete_messages",
    "can_manage_video_chats",
    "can_restrict_members",
    "can_promote_members",
    "can_change_info",
    "can_invite_users",
    "can_post_stories",
    "can_edit_stories",
    "can_delete_stories",
)


@dataclass
class Call:
    """One request the bot made: the method, its form/JSON parameters and uploaded files."""

    method: str
    params: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)
    at: float = field(default_factory=time.monotonic)
    ok: bool = True  # False when the fake answered with an error (a 429, say)
    result: Any = None  # what the fake answered (the sent Message, for a sendMessage)

    def json(self, name: str) -> Any:
        """A parameter PTB sent as a JSON string (reply_markup, media, entities)."""
        value = self.params.get(name)
        return json.loads(value) if isinstance(value, str) else value

    @property
    def chat_id(self) -> int | None:
        value = self.params.get("chat_id")
        return None if value is None else int(value)

    def buttons(self) -> list[dict[str, Any]]:
        markup = self.json("reply_markup") or {}
        return [b for row in markup.get("inline_keyboard", []) for b in row]


class FakeTelegram:
    """The Bot API for one token: ``start()``, point PTB at ``base_url``/``base_file_url``."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.port = free_port()
        self.calls: list[Call] = []
        self.updates: list[dict[str, Any]] = []
        self.files: dict[str, bytes] = {}
        self.admins: dict[int, set[int]] = {}  # chat id -> admin user ids
        self.messages: dict[tuple[int, int], dict[str, Any]] = {}
        self._failures: list[tuple[str | None, int]] = []  # (method or None=any, retry_after)
        self._delays: dict[str, float] = {}  # method -> seconds before it answers
        self._update_ids = itertools.count(1)
        self._message_ids = itertools.count(1000)
        self._file_ids = itertools.count(1)
        self.refunded: set[str] = set()  # charge ids refundStarPayment refunded
        # Telegram follows a refund (refundStarPayment, or support's) with a refunded_payment
        # message in the payer's chat (Bot API 7.10+); False: refundStarPayment sends none.
        self.announce_refunds = True
        self._payments: dict[str, dict[str, Any]] = {}  # charge id -> its successful_payment
        # The webhook (setWebhook / deleteWebhook) and, as Telegram reports it in
        # getWebhookInfo, its last delivery error: (unix time, message); tests set that.
        self.webhook_url = ""
        self.webhook_error: tuple[int, str] | None = None
        self._changed = asyncio.Condition()
        self._stopping = False
        self._runner: web.AppRunner | None = None

    # Lifecycle ------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/bot"

    @property
    def base_file_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/file/bot"

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/bot{token}/{method}", self._api)
        app.router.add_get("/file/bot{token}/{path:.+}", self._download)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        self._stopping = True
        await self._notify()  # wake pending long-polls, or shutdown waits for their timeout
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # What tests do ---------------------------------------------------------------------------

    def fail(self, times: int, *, retry_after: int = 1, method: str | None = None) -> None:
        """Answer the next ``times`` calls (of ``method``, or any but getUpdates) with a 429."""
        self._failures.extend([(method, retry_after)] * times)

    def delay(self, method: str, seconds: float) -> None:
        """Answer ``method`` only ``seconds`` after it arrived (it is recorded at once)."""
        self._delays[method] = seconds

    def add_file(self, data: bytes) -> str:
        file_id = f"file{next(self._file_ids)}"
        self.files[file_id] = data
        return file_id

    async def push(self, update: dict[str, Any], *, update_id: int | None = None) -> int:
        """Queue a raw update (its ``update_id`` is assigned unless given) and wake the poller."""
        update = {"update_id": update_id or next(self._update_ids), **update}
        self.updates.append(update)
        await self._notify()
        return int(update["update_id"])

    async def push_many(self, updates: list[dict[str, Any]]) -> None:
        """Queue several updates at once: one getUpdates answer carries them all."""
        for update in updates:
            self.updates.append({"update_id": next(self._update_ids), **update})
        await self._notify()

    def message(
        self, user: int, text: str | None = None, *, chat: int | None = None, **extra: Any
    ) -> dict[str, Any]:
        """A message update body from ``user`` (in a private chat unless ``chat`` is given)."""
        chat_id = user if chat is None else chat
        msg: dict[str, Any] = {
            "message_id": next(self._message_ids),
            "date": int(time.time()),
            "chat": self._chat(chat_id),
            "from": _user(user),
            **extra,
        }
        if text is not None:
            msg["text"] = text
            if text.startswith("/"):
                length = len(text.split()[0])
                msg["entities"] = [{"type": "bot_command", "offset": 0, "length": length}]
        return {"message": msg}

    async def send(self, user: int, text: str | None = None, **kw: Any) -> dict[str, Any]:
        update = self.message(user, text, **kw)
        await self.push(update)
        message: dict[str, Any] = update["message"]
        return message

    async def send_photo(
        self, user: int, data: bytes, caption: str | None = None, **kw: Any
    ) -> dict[str, Any]:
        file_id = self.add_file(data)
        photo = [{"file_id": file_id, "file_unique_id": f"u{file_id}", "width": 64, "height": 64}]
        extra: dict[str, Any] = {"photo": photo, **({"caption": caption} if caption else {})}
        return await self.send(user, None, **extra, **kw)

    async def press(self, user: int, message: dict[str, Any], data: str) -> str:
        """Press an inline button of a message the bot sent; returns the callback query id."""
        query_id = f"q{next(self._update_ids)}"
        query = {
            "id": query_id,
            "from": _user(user),
            "chat_instance": "ci",
            "data": data,
            "message": message,
        }
        await self.push({"callback_query": query})
        return query_id

    async def answer(self, query_id: str) -> Call:
        """The bot's answerCallbackQuery for a press (its ``text`` is what the person saw)."""
        call: Call = await self.wait_for(
            lambda: next(
                (
                    c
                    for c in self.calls_of("answerCallbackQuery")
                    if c.params.get("callback_query_id") == query_id
                ),
                None,
            ),
            what=f"an answer to {query_id}",
        )
        return call

    async def pre_checkout(self, user: int, invoice: Call, *, stars: int | None = None) -> Call:
        """The person confirms an invoice the bot sent: a pre_checkout_query; returns the bot's
        answerPreCheckoutQuery (``ok``, ``error_message``)."""
        query_id = f"pcq{next(self._update_ids)}"
        prices = invoice.json("prices")
        query = {
            "id": query_id,
            "from": _user(user),
            "currency": invoice.params["currency"],
            "total_amount": stars if stars is not None else int(prices[0]["amount"]),
            "invoice_payload": invoice.params["payload"],
        }
        await self.push({"pre_checkout_query": query})
        call: Call = await self.wait_for(
            lambda: next(
                (
                    c
                    for c in self.calls_of("answerPreCheckoutQuery")
                    if c.params.get("pre_checkout_query_id") == query_id
                ),
                None,
            ),
            what=f"an answer to {query_id}",
        )
        return call

    def payment(
        self, user: int, invoice: Call, charge_id: str, **extra: Any
    ) -> dict[str, Any]:
        """The successful_payment service message of ``invoice`` paid by ``user``."""
        prices = invoice.json("prices")
        payment = {
            "currency": invoice.params["currency"],
            "total_amount": int(prices[0]["amount"]),
            "invoice_payload": invoice.params["payload"],
            "telegram_payment_charge_id": charge_id,
            "provider_payment_charge_id": "",
            **extra,
        }
        self._payments[charge_id] = payment
        return self.message(user, successful_payment=payment)

    def refund_message(
        self, user: int, charge_id: str, *, invoice_payload: str | None = None,
        total_amount: int | None = None,
    ) -> dict[str, Any]:
        """The refunded_payment service message Telegram sends when ``charge_id`` is refunded
        (by refundStarPayment or by Telegram support); what it was is taken from the payment
        this fake built for it, unless given (a refund of a payment it never sent)."""
        paid = self._payments.get(charge_id, {})
        refunded = {
            "currency": "XTR",
            "total_amount": total_amount if total_amount is not None else int(
                paid.get("total_amount", 1)),
            "invoice_payload": invoice_payload if invoice_payload is not None else str(
                paid.get("invoice_payload", "")),
            "telegram_payment_charge_id": charge_id,
            "provider_payment_charge_id": "",
        }
        return self.message(user, refunded_payment=refunded)

    def calls_of(self, *methods: str, chat: int | None = None, ok: bool = True) -> list[Call]:
        """Calls of ``methods`` (to ``chat``) that succeeded (``ok=False``: that failed)."""
        return [
            c
            for c in self.calls
            if c.method in methods and (chat is None or c.chat_id == chat) and c.ok is ok
        ]

    async def wait_for(
        self, predicate: Callable[[], Any], timeout: float = 60.0, what: str = "condition"
    ) -> Any:
        """Wait until ``predicate()`` is truthy (re-checked on every call); return its value."""
        deadline = time.monotonic() + timeout
        async with self._changed:
            while not (result := predicate()):
                left = deadline - time.monotonic()
                if left <= 0:
                    methods = [c.method for c in self.calls[-15:]]
                    raise AssertionError(f"timed out waiting for {what}; last calls: {methods}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), min(left, 0.5))
        return result

    async def wait_call(
        self, method: str, chat: int | None = None, n: int = 1, timeout: float = 60.0
    ) -> Call:
        """The ``n``-th call of ``method`` (to ``chat``), waiting for it."""
        await self.wait_for(
            lambda: len(self.calls_of(method, chat=chat)) >= n, timeout, f"{n} x {method}"
        )
        return self.calls_of(method, chat=chat)[n - 1]

    # The API ---------------------------------------------------------------------------------

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _api(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return _error(401, "Unauthorized")
        method = request.match_info["method"]
        params, files = await _parse(request)
        call = Call(method, params, files)
        if method != "getUpdates":
            self.calls.append(call)
            failure = next((f for f in self._failures if f[0] in (None, method)), None)
            if failure is not None:
                self._failures.remove(failure)
                call.ok = False
                await self._notify()
                return _error(
                    429,
                    f"Too Many Requests: retry after {failure[1]}",
                    {"retry_after": failure[1]},
                )
        if method in self._delays:
            await self._notify()
            await asyncio.sleep(self._delays[method])
        handler = getattr(self, f"_m_{method}", None)
        if handler is None:
            return _error(404, f"Not Found: method {method} is not faked")
        try:
            result = await handler(call)
        except _ApiError as exc:
            call.ok = False
            return _error(400, exc.description)
        call.result = result
        await self._notify()
        return web.json_response({"ok": True, "result": result})

    async def _download(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return web.Response(status=401)
        data = self.files.get(request.match_info["path"].removeprefix("photos/"))
        if data is None:
            return web.Response(status=404)
        return web.Response(body=data, content_type="application/octet-stream")

    def _chat(self, chat_id: int) -> dict[str, Any]:
        if chat_id < 0:
            return {"id": chat_id, "type": "supergroup", "title": f"group {chat_id}"}
        return {"id": chat_id, "type": "private", "first_name": f"user{chat_id}"}

    def _sent(self, call: Call, **content: Any) -> dict[str, Any]:
        chat_id = int(call.params["chat_id"])
        msg: dict[str, Any] = {
            "message_id": next(self._message_ids),
            "date": int(time.time()),
            "chat": self._chat(chat_id),
            "from": _user(BOT_ID, bot=True),
            **content,
        }
        if "reply_markup" in call.params:
            msg["reply_markup"] = call.json("reply_markup")
        self.messages[(chat_id, msg["message_id"])] = msg
        return msg

    def _upload(self, call: Call, field_name: str, value: Any = None) -> tuple[str, int]:
        value = call.params.get(field_name) if value is None else value
        if isinstance(value, str) and value.startswith("attach://"):
            data = call.files[value.removeprefix("attach://")]
        elif field_name in call.files:
            data = call.files[field_name]
        else:
            return str(value), 0
        return self.add_file(data), len(data)

    async def _m_getMe(self, call: Call) -> Any:
        return {
            **_user(BOT_ID, bot=True),
            "username": BOT_USERNAME,
            "can_join_groups": True,
            "can_read_all_group_messages": False,
            "supports_inline_queries": False,
        }

    async def _m_getUpdates(self, call: Call) -> Any:
        offset = int(call.params.get("offset") or 0)
        timeout = float(call.params.get("timeout") or 0)
        # Confirmed updates (below offset) are gone for good, as on the real server.
        self.updates = [u for u in self.updates if u["update_id"] >= offset]
        deadline = time.monotonic() + timeout
        async with self._changed:
            while not self.updates and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    await asyncio.wait_for(self._changed.wait(), left)
                except TimeoutError:
                    break
        return self.updates[:100]

    async def _m_sendMessage(self, call: Call) -> Any:
        return self._sent(call, text=call.params.get("text", ""))

    async def _m_editMessageText(self, call: Call) -> Any:
        key = (int(call.params["chat_id"]), int(call.params["message_id"]))
        msg = self.messages.get(key)
        if msg is None:
            raise _ApiError("Bad Request: message to edit not found")
        msg["text"] = call.params.get("text", "")
        msg["edit_date"] = int(time.time())
        if "reply_markup" in call.params:
            msg["reply_markup"] = call.json("reply_markup")
        else:
            msg.pop("reply_markup", None)
        return msg

    async def _m_editMessageReplyMarkup(self, call: Call) -> Any:
        key = (int(call.params["chat_id"]), int(call.params["message_id"]))
        msg = self.messages.get(key)
        if msg is None:
            raise _ApiError("Bad Request: message to edit not found")
        msg["reply_markup"] = call.json("reply_markup")
        return msg

    async def _m_deleteMessage(self, call: Call) -> Any:
        self.messages.pop((int(call.params["chat_id"]), int(call.params["message_id"])), None)
        return True

    async def _m_sendPhoto(self, call: Call) -> Any:
        file_id, size = self._upload(call, "photo")
        photo = [
            {
                "file_id": file_id,
                "file_unique_id": f"u{file_id}",
                "width": 64,
                "height": 64,
                "file_size": size,
            }
        ]
        return self._sent(call, photo=photo, caption=call.params.get("caption"))

    async def _m_sendDocument(self, call: Call) -> Any:
        file_id, size = self._upload(call, "document")
        doc = {
            "file_id": file_id,
            "file_unique_id": f"u{file_id}",
            "file_name": "image.png",
            "mime_type": "image/png",
            "file_size": size,
        }
        return self._sent(call, document=doc, caption=call.params.get("caption"))

    async def _m_sendMediaGroup(self, call: Call) -> Any:
        out = []
        for item in call.json("media"):
            file_id, size = self._upload(call, "media", item["media"])
            ref = {"file_id": file_id, "file_unique_id": f"u{file_id}", "file_size": size}
            content = (
                {"photo": [{**ref, "width": 64, "height": 64}]}
                if item["type"] == "photo"
                else {"document": {**ref, "file_name": "image.png", "mime_type": "image/png"}}
            )
            out.append(
                self._sent(call, media_group_id="mg1", caption=item.get("caption"), **content)
            )
        return out

    async def _m_sendChatAction(self, call: Call) -> Any:
        return True

    async def _m_answerCallbackQuery(self, call: Call) -> Any:
        return True

    async def _m_sendInvoice(self, call: Call) -> Any:
        prices = call.json("prices")
        if call.params.get("currency") == "XTR":
            if call.params.get("provider_token"):
                raise _ApiError("Bad Request: a Stars invoice takes an empty provider_token")
            if len(prices) != 1:
                raise _ApiError("Bad Request: a Stars invoice must have exactly one price")
        if not 1 <= len(str(call.params.get("payload", "")).encode()) <= 128:
            raise _ApiError("Bad Request: invoice payload must be 1-128 bytes")
        invoice = {
            "title": call.params["title"],
            "description": call.params["description"],
            "start_parameter": "",
            "currency": call.params["currency"],
            "total_amount": sum(int(p["amount"]) for p in prices),
        }
        return self._sent(call, invoice=invoice)

    async def _m_createInvoiceLink(self, call: Call) -> Any:
        if call.params.get("subscription_period") not in (None, 2592000, "2592000"):
            raise _ApiError("Bad Request: SUBSCRIPTION_PERIOD_INVALID")
        return f"https://t.me/$fake{next(self._message_ids)}"

    async def _m_answerPreCheckoutQuery(self, call: Call) -> Any:
        return True

    async def _m_refundStarPayment(self, call: Call) -> Any:
        charge = str(call.params["telegram_payment_charge_id"])
        if charge in self.refunded:
            raise _ApiError("Bad Request: CHARGE_ALREADY_REFUNDED")
        self.refunded.add(charge)
        if self.announce_refunds:
            await self.push(self.refund_message(int(call.params["user_id"]), charge))
        return True

    async def _m_setMyCommands(self, call: Call) -> Any:
        return True

    async def _m_deleteWebhook(self, call: Call) -> Any:
        self.webhook_url = ""
        return True

    async def _m_setWebhook(self, call: Call) -> Any:
        self.webhook_url = str(call.params["url"])
        self.webhook_error = None
        return True

    async def _m_getWebhookInfo(self, call: Call) -> Any:
        info: dict[str, Any] = {
            "url": self.webhook_url,
            "has_custom_certificate": False,
            "pending_update_count": len(self.updates) if self.webhook_url else 0,
        }
        if self.webhook_error is not None:
            info["last_error_date"], info["last_error_message"] = self.webhook_error
        return info

    async def _m_getFile(self, call: Call) -> Any:
        file_id = call.params["file_id"]
        if file_id not in self.files:
            raise _ApiError("Bad Request: invalid file_id")
        # A relative path that exists on no disk: PTB must download it, not read it locally.
        return {
            "file_id": file_id,
            "file_unique_id": f"u{file_id}",
            "file_size": len(self.files[file_id]),
            "file_path": f"photos/{file_id}",
        }

    async def _m_getChatMember(self, call: Call) -> Any:
        chat_id, user_id = int(call.params["chat_id"]), int(call.params["user_id"])
        if user_id in self.admins.get(chat_id, set()):
            return {
                "status": "administrator",
                "user": _user(user_id),
                "is_anonymous": False,
                **dict.fromkeys(_ADMIN_RIGHTS, True),
            }
        return {"status": "member", "user": _user(user_id)}

    async def _m_getChatAdministrators(self, call: Call) -> Any:
        chat_id = int(call.params["chat_id"])
        return [
            {
                "status": "administrator",
                "user": _user(u),
                "is_anonymous": False,
                **dict.fromkeys(_ADMIN_RIGHTS, True),
            }
            for u in sorted(self.admins.get(chat_id, set()))
        ]


class _ApiError(Exception):
    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.description = description


def _user(user_id: int, *, bot: bool = False) -> dict[str, Any]:
    return {"id": user_id, "is_bot": bot, "first_name": f"user{user_id}"}


def _error(code: int, description: str, parameters: dict[str, Any] | None = None) -> web.Response:
    body: dict[str, Any] = {"ok": False, "error_code": code, "description": description}
    if parameters:
        body["parameters"] = parameters
    return web.json_response(body, status=code)


async def _parse(request: web.Request) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Form-urlencoded, JSON or multipart parameters; files from multipart parts."""
    params: dict[str, Any] = dict(request.query)
    files: dict[str, bytes] = {}
    ctype = request.content_type
    if ctype == "multipart/form-data":
        reader = await request.multipart()
        async for part in reader:
            if not isinstance(part, BodyPartReader) or part.name is None:
                continue
            data = await part.read()
            if part.filename is not None:
                files[part.name] = bytes(data)
            else:
                params[part.name] = bytes(data).decode("utf-8")
    elif ctype == "application/json":
        body = await request.read()
        if body:
            params.update(json.loads(body))
    elif request.can_read_body:
        params.update(await request.post())
    return params, files
