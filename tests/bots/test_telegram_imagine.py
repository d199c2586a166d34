"""/imagine end to end: status edits, the photo (multipart PNG with infotext) with its buttons,
one charge, gallery rows; albums; photo + caption as img2img; clear refusals without a charge."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image

from bots.common.buttons import parse
from core.infotext import read_png_infotext
from engine.demo.scenes import Scene, Shape
from engine.demo.score import score
from tests.bots.conftest import TINY, Stack


def png_bytes(width: int = 64, height: int = 48, color: str = "orange") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


async def test_imagine_posts_photo_with_buttons_and_charges_once(stack: Stack) -> None:
    fake, user = stack.fake, 1001
    before = await stack.balance(user)
    await fake.send(user, f"/imagine a lighthouse at dusk {TINY} --seed 7")

    photo = await fake.wait_call("sendPhoto", chat=user)
    status = fake.calls_of("sendMessage", chat=user)[0]
    assert status.params["text"].startswith("⏳ a lighthouse at dusk")
    assert status.at < photo.at

    png = photo.files["photo"]
    assert png.startswith(b"\x89PNG")
    info = read_png_infotext(png)
    assert info is not None and "a lighthouse at dusk" in info and "Seed: 7" in info
    labels = [b["text"] for b in photo.buttons()]
    assert {"V1", "U1"} <= set(labels) and any("Reroll" in t for t in labels)
    for b in photo.buttons():
        assert len(b["callback_data"].encode()) <= 64
        assert parse(b["callback_data"]).owner == str(user)

    (job,) = await stack.finished(1)
    assert job.idempotency_key.startswith(f"telegram:{user}:")
    assert before - await stack.balance(user) == job.cost
    (image,) = stack.images(job.id)
    assert image.account_id == job.account_id and image.width == 64

    await fake.wait_for(
        lambda: any(
            c.params.get("text", "").startswith("✅")
            for c in fake.calls_of("editMessageText", chat=user)
        ),
        what="the status message saying done",
    )
    edits = fake.calls_of("editMessageText", chat=user)
    assert {int(e.params["message_id"]) for e in edits} == {status.result["message_id"]}
    # The bot told the store the photo reached its user: the dispatchers will not re-announce it.
    (row,) = await fake.wait_for(
        lambda: [j for j in stack.jobs() if j.id == job.id and j.delivered_at is not None] or None,
        what="the job marked delivered",
    )
    assert row.delivered_at is not None and row.delivered_at >= row.finished_at


async def test_status_shows_the_queue_position_then_the_steps(stack: Stack) -> None:
    fake, user = stack.fake, 1007
    await stack.stop_bot()
    await stack.start_bot(progress_interval_s=0.1)
    await stack.stop_dispatcher()  # the job waits in the queue until the dispatcher is back
    await fake.send(user, "/imagine a slow sunrise --w 64 --h 64 --steps 10")
    status = await fake.wait_call("sendMessage", chat=user)

    def edits() -> list[str]:
        return [c.params["text"] for c in fake.calls_of("editMessageText", chat=user)]

    await fake.wait_for(
        lambda: any("position 1 in the queue" in t for t in edits()), what="the queue position"
    )
    await stack.start_dispatcher()
    photo = await fake.wait_call("sendPhoto", chat=user)
    await fake.wait_for(lambda: any(t.startswith("✅") for t in edits()), what="done")

    shown = edits()
    position = next(i for i, t in enumerate(shown) if "position 1" in t)
    step = next(i for i, t in enumerate(shown) if "/10" in t)
    assert position < step < len(shown) - 1 and shown[-1].startswith("✅")
    assert "Rendering" in shown[step]
    calls = fake.calls_of("editMessageText", chat=user)
    assert {int(c.params["message_id"]) for c in calls} == {status.result["message_id"]}
    gaps = [b.at - a.at for a, b in zip(calls, calls[1:], strict=False)]
    assert min(gaps) >= 0.09  # one edit per interval per chat
    actions = fake.calls_of("sendChatAction", chat=user)
    assert actions and actions[0].params["action"] == "upload_photo"
    assert actions[0].at < photo.at


async def test_png_files_and_images_over_the_photo_limit_go_as_documents(stack: Stack) -> None:
    fake, user = stack.fake, 1008
    await fake.send(user, f"/imagine an old map {TINY} --png")
    original = await fake.wait_call("sendDocument", chat=user)
    png = original.files["document"]
    assert "an old map" in (read_png_infotext(png) or "")
    assert original.params["caption"].startswith("an old map")
    assert any(b["text"] == "U1" for b in original.buttons())
    await stack.finished(1)

    await stack.stop_bot()
    await stack.start_bot(photo_max_bytes=1024)  # as if the image were over 10 MB
    await fake.send(user, f"/imagine a huge mural {TINY}")
    large = await fake.wait_call("sendDocument", chat=user, n=2)
    assert len(large.files["document"]) > 1024
    assert "a huge mural" in (read_png_infotext(large.files["document"]) or "")
    assert any("Reroll" in b["text"] for b in large.buttons())
    assert not fake.calls_of("sendPhoto", chat=user)


async def test_album_with_png_files_and_a_keyboard_message(stack: Stack) -> None:
    fake, user = stack.fake, 1002
    await fake.send(user, f"/imagine two foxes {TINY} --n 2 --png")

    album = await fake.wait_call("sendMediaGroup", chat=user)
    media = album.json("media")
    assert [m["type"] for m in media] == ["document", "document"]
    pngs = [album.files[m["media"].removeprefix("attach://")] for m in media]
    assert all("two foxes" in (read_png_infotext(p) or "") for p in pngs)
    keyboard = await fake.wait_call("sendMessage", chat=user, n=2)
    labels = [b["text"] for b in keyboard.buttons()]
    assert {"V1", "V2", "U1", "U2"} <= set(labels)
    (job,) = await stack.finished(1)
    assert len(stack.images(job.id)) == 2
    assert not fake.calls_of("sendPhoto", chat=user)

    # V2 repaints the second image of the album, U2 enlarges it with its seed.
    for label in ("V2", "U2"):
        data = next(b["callback_data"] for b in keyboard.buttons() if b["text"] == label)
        await fake.answer(await fake.press(user, keyboard.result, data))
    jobs = await stack.finished(3)
    second = sorted(stack.images(job.id), key=lambda i: i.index)[1]
    by_kind = {stack.request_of(j).kind.value: stack.request_of(j) for j in jobs[1:]}
    assert by_kind["variation"].init_image == pngs[1]
    assert by_kind["upscale"].init_image == pngs[1]
    assert by_kind["upscale"].seed == second.seed
    assert (by_kind["upscale"].width, by_kind["upscale"].height) == (128, 128)


async def test_plain_text_in_private_is_a_prompt(stack: Stack) -> None:
    fake, user = stack.fake, 1003
    # Issue 10: plain text now gets a preview first (tests/bots/test_chat_flows.py); the old
    # behaviour, tested here, is what ATELIER_TELEGRAM_PLAIN_TEXT_PREVIEW=false keeps.
    await stack.stop_bot()
    stack.settings = stack.settings.model_copy(update={"telegram_plain_text_preview": False})
    await stack.start_bot()
    await fake.send(user, f"a quiet harbour {TINY}")
    await fake.wait_call("sendPhoto", chat=user)
    (job,) = await stack.finished(1)
    assert "a quiet harbour" in job.request_json


async def test_photo_with_caption_is_img2img(stack: Stack) -> None:
    fake, user = stack.fake, 1004
    # An album: Telegram sends each photo as a message, the caption on one of them.
    await fake.send_photo(
        user,
        png_bytes(96, 64),
        caption="as a watercolor --steps 2 --strength 0.5",
        media_group_id="album1",
    )
    await fake.send_photo(user, png_bytes(64, 64, "blue"), media_group_id="album1")
    await fake.send_photo(user, png_bytes(64, 64, "green"), media_group_id="album1")

    await fake.wait_call("sendPhoto", chat=user)
    assert fake.calls_of("getFile")
    replies = [c.params["text"] for c in fake.calls_of("sendMessage", chat=user)]
    assert sum("one photo at a time" in t for t in replies) == 1  # said once per album
    (job,) = await stack.finished(1)
    request = stack.request_of(job)
    assert request.kind.value == "img2img" and request.strength == 0.5
    assert request.init_image is not None
    assert request.width / request.height > 1.2  # the photo's landscape shape is kept


async def test_what_is_not_supported_gets_a_clear_answer(stack: Stack) -> None:
    fake, user = stack.fake, 1005
    await fake.send_photo(user, png_bytes())
    sticker = {
        "file_id": "s1",
        "file_unique_id": "us1",
        "width": 512,
        "height": 512,
        "is_animated": False,
        "is_video": False,
        "type": "regular",
    }
    await fake.send(user, None, sticker=sticker)
    voice = {"file_id": "v1", "file_unique_id": "uv1", "duration": 2}
    await fake.send(user, None, voice=voice)

    await fake.wait_call("sendMessage", chat=user, n=3)
    replies = [c.params["text"] for c in fake.calls_of("sendMessage", chat=user)]
    assert "caption" in replies[0]
    assert "A sticker is not something I can use" in replies[1]
    assert "A voice message" in replies[2]
    assert not stack.jobs()


async def test_refusals_are_one_clear_line_and_cost_nothing(stack: Stack) -> None:
    fake, user = stack.fake, 1006
    full = await stack.balance(user)
    await fake.send(user, f"/imagine a cat {TINY} --seed banana")
    await fake.send(user, f"/imagine a nude portrait {TINY}")
    # 4 images x 3 styles = 12 credits; the free tier has 10 a day.
    await fake.send(user, f"/imagine a cat {TINY} --n 4 --style anime,watercolor,sketch")
    bomb = _bomb_png()
    await fake.send_photo(user, bomb, caption="make it pop")
    # Telegram says a file's size up front: one over the limit is never downloaded.
    huge = {"file_id": "huge", "file_unique_id": "uhuge", "width": 9000, "height": 9000}
    await fake.send(user, None, photo=[{**huge, "file_size": 25 * 2**20}], caption="redo it")

    def lines() -> list[str]:
        sent = [c.params["text"] for c in fake.calls_of("sendMessage", chat=user)]
        edited = [c.params["text"] for c in fake.calls_of("editMessageText", chat=user)]
        return [t for t in sent + edited if t.startswith("⚠️")]

    await fake.wait_for(lambda: len(lines()) >= 5, what="five refusals")
    text = "\n".join(lines())
    assert "The photo is 25.0 MB; the limit is 20.0 MB" in text
    assert not [c for c in fake.calls_of("getFile") if c.params["file_id"] == "huge"]
    assert "--seed expects a whole number" in text
    assert "not allowed here" in text and "nothing was charged" in text
    assert "credits" in text.lower()
    assert "too many pixels" in text or "pixels" in text
    assert all(f"Credits left: {full}." in line for line in lines())
    assert all("Traceback" not in line for line in lines())
    assert await stack.balance(user) == full
    assert not stack.jobs()


def _bomb_png(side: int = 30_000) -> bytes:
    """A tiny PNG declaring side x side pixels: it must be refused before it is decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(data, zlib.crc32(kind))
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


async def test_a_demo_model_picture_shows_what_the_prompt_asked(stack: Stack) -> None:
    """The delivered photo itself, read back by the scorer: the prompt reached the model and
    the right picture reached its person."""
    fake, user = stack.fake, 1002
    await fake.send(user, "/imagine a red circle on a blue background --model demo --seed 3")
    photo = await fake.wait_call("sendPhoto", chat=user, timeout=120)
    with Image.open(io.BytesIO(photo.files["photo"])) as image:
        found = score(image, Scene("blue", (Shape("red", "circle"),)))
    assert found["background"] and found["colour"], found
