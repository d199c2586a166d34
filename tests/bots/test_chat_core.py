"""The chat core (bots/common) driven directly through an in-memory platform adapter (a test
double of the PLATFORM, not of our modules), over the real client, Redis, store and a worker:
what any adapter (Telegram, Discord) gets from it."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from bots.common import account, actions, jobs, texts
from bots.common.buttons import Action, button, parse
from bots.common.core import ChatCore
from bots.common.delivery import DeliveryLoop
from bots.common.keyboards import Keyboard
from bots.common.port import Destination, Outgoing, Part, Picture, Press, Who
from bots.common.prefs import UserPrefs
from bots.common.progress import ProgressEditor
from bots.common.requests import parse_prompt
from core.errors import InsufficientCredits, NotFound
from core.jobs import DeliveryTarget, Requester
from storage import accounts
from tests.bots.conftest import TINY, Stack

PLATFORM = "memchat"


@dataclass
class Message:
    chat_id: str
    text: str
    keyboard: Keyboard | None
    edits: list[tuple[str, Keyboard | None]] = field(default_factory=list)


@dataclass
class MemoryPort:
    """A chat platform kept in lists: what the core posted, edited and uploaded."""

    platform: str = PLATFORM
    photo_max_bytes: int = 10 * 2**20
    album_max: int = 10
    keyboard_on_album: bool = True
    messages: dict[str, Message] = field(default_factory=dict)
    uploads: list[tuple[str, list[Picture], Keyboard]] = field(default_factory=list)
    private: list[tuple[str, str]] = field(default_factory=list)
    admins: set[str] = field(default_factory=set)
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    # While set and not yet open, a message is posted but its id comes back only once open.
    gate: asyncio.Event | None = None

    async def send(
        self,
        chat_id: str,
        text: str,
        keyboard: Keyboard | None = None,
        *,
        reply_to: str | None = None,
        via: object = None,
        private: bool = False,
    ) -> str:
        message_id = str(next(self.ids))
        self.messages[message_id] = Message(chat_id, text, keyboard)
        if self.gate is not None:
            await self.gate.wait()
        return message_id

    async def edit(
        self,
        chat_id: str,
        message_id: str,
        text: str,
        keyboard: Keyboard | None = None,
        *,
        via: object = None,
    ) -> None:
        message = self.messages[message_id]
        message.text, message.keyboard = text, keyboard
        message.edits.append((text, keyboard))

    async def edit_keyboard(
        self, chat_id: str, message_id: str, keyboard: Keyboard, *, via: object = None
    ) -> None:
        self.messages[message_id].keyboard = keyboard

    async def delete(self, chat_id: str, message_id: str) -> None:
        self.messages.pop(message_id, None)

    async def send_private(self, user_id: str, text: str) -> bool:
        self.private.append((user_id, text))
        return True

    async def is_admin(self, chat_id: str, user_id: str, *, via: object = None) -> bool:
        return user_id in self.admins

    async def show_working(self, chat_id: str) -> None:
        return None

    async def send_part(self, to: Destination, part: Part, outgoing: Outgoing) -> str:
        await outgoing.sending()
        assert part.keyboard is not None
        self.uploads.append((to.chat_id, list(part.pictures), part.keyboard))
        return str(next(self.ids))


@pytest.fixture
async def chat(backend: Stack) -> AsyncIterator[tuple[ChatCore, MemoryPort]]:
    port = MemoryPort()
    core = ChatCore(
        settings=backend.settings,
        client=backend.client,
        state=backend.state,
        port=port,
        editor=ProgressEditor(0.05),
        styles=backend.client.styles,
    )

    async def handle(event: object) -> None:
        await jobs.deliver(core, event)  # type: ignore[arg-type]

    core.delivery = DeliveryLoop(
        backend.broker,
        PLATFORM,
        "memchat-test",
        handle,
        backend.state,
        block_ms=200,
        mark_delivered=backend.client.mark_delivered,
    )
    core.start()
    try:
        yield core, port
    finally:
        core.stop_reading()
        await core.stop()


def keys(keyboard: Keyboard | None) -> list[str]:
    return [k.label for row in keyboard or () for k in row]


async def wait_for(check: object, what: str, timeout: float = 60) -> None:
    async with asyncio.timeout(timeout):
        while not check():  # type: ignore[operator]
            await asyncio.sleep(0.05)


async def test_a_job_behind_one_status_then_images_with_buttons_once(
    chat: tuple[ChatCore, MemoryPort], backend: Stack
) -> None:
    core, port = chat
    who = Who(user_id="501", chat_id="501", private=True, name="Ada")
    job = await jobs.imagine(core, who, f"a red kite {TINY} --seed 3", idempotency_key="mem:1")
    assert job is not None and job.created
    (status_id,) = port.messages
    assert port.messages[status_id].text.startswith("⏳ a red kite")

    await wait_for(lambda: port.uploads, "the images")
    await wait_for(lambda: port.messages[status_id].text.startswith("✅"), "the final status")
    # Until then the status carried a cancel button.
    edits = port.messages[status_id].edits
    assert keys(edits[0][1]) == ["✖ Cancel"] and edits[-1][1] is None
    ((chat_id, pictures, keyboard),) = port.uploads
    assert chat_id == "501" and len(pictures) == 1 and pictures[0].png.startswith(b"\x89PNG")
    assert "seed 3" in pictures[0].caption
    assert {"V1", "U1", "🔄 Reroll"} <= set(keys(keyboard))
    assert all(parse(k.data).owner == "501" for row in keyboard for k in row)
    assert port.messages[status_id].keyboard is None

    # The same delivery again (a re-announcement): nothing posted twice.
    event = await backend.client.wait(job.job_id)
    await jobs.deliver(core, event)
    assert len(port.uploads) == 1


async def test_a_refusal_only_submit_sees_leaves_no_status_behind(
    chat: tuple[ChatCore, MemoryPort], backend: Stack
) -> None:
    """Three prompts at once on a tier allowing two jobs at a time: all three pass the price
    check, the third is refused at submit. Its status goes; the refusal is one line."""
    core, port = chat
    await backend.stop_dispatcher()  # the jobs stay queued, holding the tier's two slots
    who = Who(user_id="502", chat_id="502", private=True)
    await backend.client.balance(core.plain_requester("502"))  # the account, before the race
    port.gate = asyncio.Event()
    runs = [
        asyncio.create_task(
            jobs.imagine(core, who, f"a kite {n} {TINY}", idempotency_key=f"mem:race{n}")
        )
        for n in range(3)
    ]
    await wait_for(lambda: len(port.messages) == 3, "three statuses, each checked")
    port.gate.set()
    made = [job for job in await asyncio.gather(*runs) if job is not None]
    assert len(made) == 2 and len(backend.jobs()) == 2
    left = [m.text for m in port.messages.values()]
    assert sorted(t[0] for t in left) == ["⏳", "⏳", "⚠"]
    assert "2 jobs queued or running" in next(t for t in left if t.startswith("⚠"))
    assert not [e for m in port.messages.values() for e, _ in m.edits if e.startswith("⚠")]


async def test_presses_check_the_owner_and_run_the_right_job(
    chat: tuple[ChatCore, MemoryPort], backend: Stack
) -> None:
    core, port = chat
    who = Who(user_id="502", chat_id="-77", private=False, name="Bo")
    job = await jobs.imagine(core, who, f"a kite {TINY}", idempotency_key="mem:2")
    assert job is not None
    await backend.client.wait(job.job_id)

    stranger = Who(user_id="503", chat_id="-77", private=False)
    data = button(Action.reroll, "502", job.job_id)
    refused = await actions.on_press(core, Press(stranger, data, press_id="p1"))
    assert refused.alert and refused.text == texts.NOT_YOURS

    answer = await actions.on_press(core, Press(who, data, press_id="p2"))
    assert answer.text is not None and answer.text.startswith("Rerolling")
    again = await actions.on_press(core, Press(who, data, press_id="p2"))  # the same press
    assert not again.alert
    rerolls = [j for j in backend.jobs() if j.id != job.job_id]
    assert len(rerolls) == 1 and rerolls[0].idempotency_key == f"{PLATFORM}:cb:p2"

    expired = await actions.on_press(core, Press(who, "zz:1", press_id="p3"))
    assert expired.text == texts.EXPIRED_BUTTON

    # Group settings are for admins; the answer says so.
    gs = button(Action.group_setting, None, None, "anyone=1")
    assert (await actions.on_press(core, Press(who, gs, "p4"))).text == texts.ADMINS_ONLY
    port.admins.add("502")
    settings_id = await port.send("-77", "settings")
    saved = await actions.on_press(core, Press(who, gs, "p5", message_id=settings_id))
    assert saved.text == "Saved." and (await core.prefs.group("-77")).anyone_can_press
    assert "usable by anyone" in port.messages[settings_id].text
    # Now anyone in the group may press result buttons (on their own credits).
    other = await actions.on_press(core, Press(stranger, data, press_id="p6"))
    assert other.text is not None and other.text.startswith("Rerolling")


async def test_account_use_cases_say_one_thing_each(
    chat: tuple[ChatCore, MemoryPort], backend: Stack
) -> None:
    core, port = chat
    private = Who(user_id="504", chat_id="504", private=True, name="Cy")
    group = Who(user_id="504", chat_id="-9", private=False, name="Cy")
    assert "daily credits left" in (await account.credits(core, private)).text
    assert (await account.cancel_latest(core, private)).text == texts.NOTHING_TO_CANCEL
    assert "/link" in (await account.link(core, group, "")).text  # never in a group
    code = (await account.link(core, private, "")).text
    assert "link code" in code
    # In a group the gallery link goes privately, and nothing is said in the group.
    assert await account.gallery(core, group) is None
    ((user, text),) = port.private
    assert user == "504" and "https://atelier.example/g/" in text
    history = await account.history(core, private)
    assert history.text.startswith("No jobs yet") and history.keyboard is None


async def test_quote_prices_without_writing(backend: Stack) -> None:
    client = backend.client
    newcomer = Requester(platform=PLATFORM, platform_user_id="601", display_name="Di")
    small = parse_prompt(f"a cat {TINY}", UserPrefs()).request
    quote = await client.quote(small, newcomer, "mem:q1")
    assert (quote.cost, quote.credits, quote.repeat_of) == (1, 10, None)
    assert quote.request.seed is not None and quote.request.model == "tiny"
    big = parse_prompt(f"a cat {TINY} --n 4 --style anime,watercolor,sketch", UserPrefs()).request
    with pytest.raises(InsufficientCredits, match="needs 12 credits; you have 10$"):
        await client.quote(big, newcomer, "mem:q2")
    with backend.sessions() as session, pytest.raises(NotFound):  # asking made no account
        accounts.find_account(session=session, platform=PLATFORM, platform_user_id="601")

    # An existing account: its real balance, and the job a key already made.
    job = await client.submit(small, newcomer, DeliveryTarget(frontend=PLATFORM), "mem:q3")
    assert (await client.quote(small, newcomer, "mem:q3")).repeat_of == job.job_id
    assert (await client.quote(small, newcomer, "mem:q4")).credits == 10 - job.cost
    with pytest.raises(InsufficientCredits, match="needs 12 credits; you have 9$"):
        await client.quote(big, newcomer, "mem:q5")
