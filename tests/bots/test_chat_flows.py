"""Issue 10's chat flows, end to end through the fake Bot API: refusals before any status
message, U buttons only where an upscale fits, advice that fits the error, plain text as a
preview, progress that resumes after a restart, first replies ahead of progress edits."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bots.common.buttons import Action, button
from bots.telegram.ratelimit import FloodLimiter
from tests.bots.conftest import TINY, Stack
from tests.bots.test_telegram_buttons import data_of, press


def texts_to(stack: Stack, user: int, method: str = "sendMessage") -> list[str]:
    return [c.params.get("text", "") for c in stack.fake.calls_of(method, chat=user)]


async def test_refusals_and_repeats_post_no_status_first(stack: Stack) -> None:
    fake, user = stack.fake, 5001
    full = await stack.balance(user)
    # 4 images x 3 styles = 12 credits; the free tier has 10 a day: refused at the price check.
    await fake.send(user, f"/imagine a cat {TINY} --n 4 --style anime,watercolor,sketch")
    await fake.wait_for(lambda: texts_to(stack, user), what="the refusal")
    await asyncio.sleep(0.5)
    (line,) = texts_to(stack, user)
    assert line.startswith("⚠️ This needs 12 credits") and f"Credits left: {full}." in line
    assert not fake.calls_of("editMessageText", "deleteMessage", chat=user)

    # The same message delivered again after its job exists: nothing posted, nothing deleted.
    update = fake.message(user, f"/imagine twin moons {TINY}")
    await fake.push(update)
    await fake.wait_call("sendPhoto", chat=user)
    await stack.finished(1)
    sent = len(texts_to(stack, user))
    await fake.push(update)
    await asyncio.sleep(1.5)
    assert len(texts_to(stack, user)) == sent
    assert not fake.calls_of("deleteMessage", chat=user)
    assert len(stack.jobs()) == 1
    assert await stack.balance(user) == full - stack.jobs()[0].cost


async def test_upscale_buttons_only_where_an_upscale_fits(stack: Stack) -> None:
    fake, user = stack.fake, 5002
    # The tiny model's largest side is 512: a 512-wide image cannot grow.
    await fake.send(user, "/imagine a wide dune --w 512 --h 256 --steps 2")
    photo = await fake.wait_call("sendPhoto", chat=user)
    labels = [b["text"] for b in photo.buttons()]
    assert "V1" in labels and "U1" not in labels
    (job,) = await stack.finished(1)

    # A U1 press anyway (an old message, forged data): the refusal fits a button.
    message: dict[str, Any] = photo.result
    query = await fake.press(user, message, button(Action.upscale, user, job.id, 1))
    answer = (await fake.answer(query)).params
    assert answer["show_alert"] in (True, "true", "True")
    assert "cannot be upscaled" in answer["text"] and "/help" not in answer["text"]
    assert len(stack.jobs()) == 1

    await fake.send(user, f"/imagine a small dune {TINY}")
    small = await fake.wait_call("sendPhoto", chat=user, n=2)
    assert "U1" in [b["text"] for b in small.buttons()]


async def test_a_corrupt_photo_is_not_a_readable_image(stack: Stack) -> None:
    fake, user = stack.fake, 5003
    broken = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\x0dIHDR" + b"garbage" * 20
    await fake.send_photo(user, broken, caption="as a watercolor")
    await fake.wait_for(lambda: texts_to(stack, user), what="the refusal")
    (line,) = texts_to(stack, user)
    assert "that file is not a readable image" in line and "smaller" not in line
    assert not stack.jobs()


async def test_plain_text_gets_a_preview_and_imagine_makes_it_once(stack: Stack) -> None:
    fake, user = stack.fake, 5004
    full = await stack.balance(user)
    await fake.send(user, f"hello there {TINY}")
    preview = await fake.wait_call("sendMessage", chat=user)
    assert preview.params["text"].startswith("✨ hello there")
    assert "1 credit" in preview.params["text"]
    await asyncio.sleep(0.5)
    assert not stack.jobs() and await stack.balance(user) == full

    answer = await press(stack, user, preview, "Imagine")
    assert answer.params["text"].startswith("Imagining")
    await fake.wait_call("sendPhoto", chat=user)
    (job,) = await stack.finished(1)
    assert "hello there" in job.request_json
    again = await stack.fake.press(user, preview.result, data_of(preview, "Imagine"))
    await stack.fake.answer(again)
    await asyncio.sleep(0.5)
    assert len(stack.jobs()) == 1 and len(fake.calls_of("sendPhoto", chat=user)) == 1
    assert await stack.balance(user) == full - job.cost


async def test_progress_resumes_after_a_restart(stack: Stack) -> None:
    fake, user = stack.fake, 5006
    await stack.stop_dispatcher()  # the job waits in the queue while the bot restarts
    await fake.send(user, "/imagine a slow tide --w 64 --h 64 --steps 20")
    status = await fake.wait_call("sendMessage", chat=user)
    await fake.wait_for(
        lambda: any("position" in t for t in texts_to(stack, user, "editMessageText")),
        what="the queue position",
    )
    await stack.stop_bot()
    before = len(fake.calls_of("editMessageText", chat=user))

    await stack.start_bot(progress_interval_s=0.1)  # each tick shown, not coalesced
    await stack.start_dispatcher()
    await fake.wait_call("sendPhoto", chat=user)
    await fake.wait_for(
        lambda: any(t.startswith("✅") for t in texts_to(stack, user, "editMessageText")),
        what="the final status",
    )
    after = fake.calls_of("editMessageText", chat=user)[before:]
    assert {int(c.params["message_id"]) for c in after} == {status.result["message_id"]}
    progress = [c.params["text"] for c in after if c.params["text"].startswith("🎨")]
    assert progress, "no progress edit after the restart"
    await asyncio.sleep(0.5)
    assert len(fake.calls_of("sendPhoto", chat=user)) == 1


async def test_first_replies_go_before_waiting_progress_edits() -> None:
    limiter = FloodLimiter(overall_per_s=20, private_per_s=100, private_burst=100)
    await limiter.initialize()
    done: list[tuple[str, float]] = []

    async def call(name: str) -> bool:
        done.append((name, time.monotonic()))
        return True

    async def send(endpoint: str, chat: int, name: str) -> None:
        await limiter.process_request(call, (name,), {}, endpoint, {"chat_id": chat}, None)

    # 300 progress edits (15 s of the overall budget) wait when three people write.
    edits = [
        asyncio.create_task(send("editMessageText", 1000 + i, f"edit{i}")) for i in range(300)
    ]
    await asyncio.sleep(0.3)
    for person in (41, 42, 43):
        started = time.monotonic()
        before = len(done)
        await send("sendMessage", person, f"reply{person}")
        assert time.monotonic() - started < 0.3
        # At most the edit that held the next token went first.
        assert sum(1 for name, _ in done[before:] if name.startswith("edit")) <= 1
    await limiter.shutdown()
    results = await asyncio.gather(*edits, return_exceptions=True)
    assert all(r is None or type(r).__name__ == "Stopping" for r in results)
