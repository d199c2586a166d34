"""/grid in both bots, end to end against their loopback fakes: one status, the cells run as
ordinary jobs (each in the gallery), one labelled contact sheet posted once, the sum charged;
refusals are one line and free."""

from __future__ import annotations

import io

from PIL import Image

from testing.discord import payloads as p
from tests.bots.conftest import TINY, Stack
from tests.bots.discord_conftest import DiscordStack
from tests.bots.discord_helpers import ALICE, images_of


async def test_telegram_grid_posts_one_labelled_sheet_and_charges_the_sum(stack: Stack) -> None:
    fake, user = stack.fake, 2001
    before = await stack.balance(user)
    await fake.send(user, f"/grid a lighthouse at dusk {TINY} --seed 7 --x cfg=3,7 "
                          "--y sr=lighthouse,castle")
    photo = await fake.wait_call("sendPhoto", chat=user, timeout=120)
    status = fake.calls_of("sendMessage", chat=user)[0]
    assert status.params["text"].startswith("⏳ a lighthouse at dusk")
    assert "2 x 2 grid: cfg x prompt: 4 cells queued (4 credits)" in status.params["text"]
    sheet = Image.open(io.BytesIO(photo.files["photo"]))
    assert sheet.width > 2 * 64 and sheet.height > 2 * 64  # the cells and the label bands
    assert "Script: X/Y/Z plot, X Type: CFG Scale" in sheet.info["parameters"]
    assert [b["text"] for b in photo.buttons()] == ["🖼 Gallery"]

    jobs = await stack.finished(4)
    assert len(jobs) == 4
    requests = [stack.request_of(j) for j in jobs]
    assert sorted((r.guidance, r.prompt) for r in requests) == [
        (3.0, "a castle at dusk"), (3.0, "a lighthouse at dusk"),
        (7.0, "a castle at dusk"), (7.0, "a lighthouse at dusk"),
    ]
    assert {r.seed for r in requests} == {7}
    assert all(len(stack.images(j.id)) == 1 for j in jobs)  # every cell in the gallery
    assert before - await stack.balance(user) == sum(j.cost for j in jobs) == 4
    await fake.wait_for(
        lambda: any(c.params.get("text", "").startswith("✅")
                    for c in fake.calls_of("editMessageText", chat=user)),
        what="the status saying done",
    )
    assert len(fake.calls_of("sendPhoto", "sendMediaGroup", "sendDocument", chat=user)) == 1


async def test_telegram_grid_refusals_are_one_line_and_free(stack: Stack) -> None:
    fake, user = stack.fake, 2002
    await fake.send(user, f"/grid a fox {TINY} --x colour=1,2")
    refusal = await fake.wait_call("sendMessage", chat=user)
    assert "unknown axis 'colour'" in refusal.params["text"].lower()
    await fake.send(user, "/grid")
    usage = await fake.wait_call("sendMessage", chat=user, n=2)
    assert "--x cfg=3,7,11" in usage.params["text"]
    await fake.send(user, f"/grid a fox {TINY} --x seed=1-30 --y steps=1,2,3")
    capped = await fake.wait_call("sendMessage", chat=user, n=3)
    assert "a grid may have at most 64" in capped.params["text"]
    assert stack.jobs() == []


async def test_telegram_grid_cancel_button_cancels_its_queued_cells_and_refunds(
        stack: Stack) -> None:
    """The grid's status carries a Cancel grid button while cells wait: only the asker may
    press it; it cancels every cell through the ordinary cancel path and releases their
    credits, and the status says so (no sheet of grey cells)."""
    from tests.bots.test_telegram_buttons import press

    fake, user = stack.fake, 2003
    full = await stack.balance(user)
    await stack.stop_dispatcher()  # the cells stay queued
    await fake.send(user, f"/grid a slow snail {TINY} --x seed=1,2,3")
    status = await fake.wait_for(
        lambda: next((c for c in fake.calls_of("editMessageText", chat=user)
                      if "Cancel grid" in str(c.params.get("reply_markup"))), None),
        what="the grid's status with a Cancel grid button",
    )
    assert await stack.balance(user) == full - 3
    refused = await press(stack, 2004, status, "Cancel grid")
    assert "belong to the person who asked" in refused.params["text"]
    answer = await press(stack, user, status, "Cancel grid")
    assert answer.params["text"] == "🚫 3 cells cancelled before starting and refunded."
    jobs = await stack.finished(3)
    assert [j.status.value for j in jobs] == ["cancelled"] * 3
    assert await stack.balance(user) == full
    await fake.wait_for(
        lambda: any("cancelled, none of its 3 cells made" in c.params.get("text", "")
                    for c in fake.calls_of("editMessageText", chat=user)),
        what="the status saying the grid was cancelled",
    )
    again = await press(stack, user, status, "Cancel grid")  # nothing left to cancel
    assert again.params["text"] == "🚫 3 cells had already ended."
    await stack.start_dispatcher()
    assert not fake.calls_of("sendPhoto", "sendDocument", chat=user)


async def test_discord_grid_defers_then_posts_the_sheet(discord_stack: DiscordStack) -> None:
    fake = discord_stack.fake
    inter = await fake.slash(
        ALICE, "grid",
        [p.option("prompt", f"a lighthouse {TINY} --seed 3"), p.option("x", "seed=1,2,3")],
    )
    result = await fake.wait_for(
        lambda: calls[0] if (calls := images_of(fake, inter.token)) else None, 120, "the sheet"
    )
    assert inter.callback is not None and inter.callback.json["type"] in (4, 5)
    [sheet_file] = result.files
    sheet = Image.open(io.BytesIO(sheet_file.data))
    assert sheet.width >= 3 * 64
    jobs = await discord_stack.finished(3)
    assert sorted(discord_stack.request_of(j).seed or 0 for j in jobs) == [1, 2, 3]

    refused = await fake.slash(
        ALICE, "grid", [p.option("prompt", f"a fox {TINY}"), p.option("x", "steps=1.5")]
    )
    await fake.wait_for(lambda: refused.callback, what="the refusal")
    assert refused.callback is not None
    body = refused.callback.json
    assert body["data"]["flags"] & 64 and "whole numbers" in body["data"]["content"]
