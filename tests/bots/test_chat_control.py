"""``--control`` in the chats: the attached picture becomes the ControlNet unit's (not an init
image), through the real Telegram and Discord bots on their loopback fakes; refused without."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw

from core.images import decode_png_rgb
from testing.discord import payloads as p
from tests.bots.conftest import TINY, Stack
from tests.bots.discord_conftest import DiscordStack
from tests.bots.discord_helpers import ALICE, result_of


def drawing(width: int = 96, height: int = 64) -> bytes:
    """A black square on white: a picture whose edges a Canny map shows."""
    out = io.BytesIO()
    image = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(image).rectangle((20, 16, 60, 48), fill="black")
    image.save(out, format="PNG")
    return out.getvalue()


def same_picture(png: bytes, sent: bytes) -> bool:
    return decode_png_rgb(png).tobytes() == Image.open(io.BytesIO(sent)).convert("RGB").tobytes()


async def test_telegram_photo_with_control_caption_is_the_control_picture(stack: Stack) -> None:
    fake, user = stack.fake, 1201
    sent = drawing()
    await fake.send_photo(
        user, sent,
        caption="a castle --steps 2 --control canny --control-weight 0.8 "
                "--control-start 0.1 --control-end 0.7",
    )
    await fake.wait_call("sendPhoto", chat=user)
    (job,) = await stack.finished(1)
    assert job.status.value == "succeeded"
    request = stack.request_of(job)
    assert request.kind.value == "txt2img" and request.init_image is None
    unit = request.control
    assert unit is not None
    # Admission named the catalogue's ControlNet for canny and the tiny model's family.
    assert (unit.controlnet, unit.preprocessor) == ("edges", "canny")
    assert (unit.weight, unit.start, unit.end) == (0.8, 0.1, 0.7)
    assert same_picture(unit.image, sent)
    assert request.width / request.height == 1.5  # the picture's landscape shape is kept


async def test_telegram_control_without_a_picture_is_refused(stack: Stack) -> None:
    fake, user = stack.fake, 1202
    full = await stack.balance(user)
    await fake.send(user, f"/imagine a castle {TINY} --control canny")
    await fake.send(user, f"/imagine a castle {TINY} --control canny --control-weight 5")

    def lines() -> list[str]:
        return [c.params["text"] for c in fake.calls_of("sendMessage", chat=user)
                if c.params["text"].startswith("⚠️")]

    await fake.wait_for(lambda: len(lines()) >= 2, what="two refusals")
    text = "\n".join(lines())
    assert "--control needs a picture: attach one" in text
    assert "--control-weight" in text and "5.0" in text
    assert not stack.jobs() and await stack.balance(user) == full


async def test_discord_image_option_with_control_is_the_control_picture(
    discord_stack: DiscordStack,
) -> None:
    fake = discord_stack.fake
    sent = drawing(64, 96)
    attachment = fake.add_attachment(sent)
    inter = await fake.slash(
        ALICE,
        "imagine",
        [p.option("prompt", "a tower --steps 2 --control edges --control-end 0.5"),
         p.option("image", attachment["id"], 11)],
        attachments=[attachment],
    )
    await result_of(discord_stack, inter)
    (job,) = await discord_stack.finished(1)
    request = discord_stack.request_of(job)
    assert request.kind.value == "txt2img" and request.init_image is None
    unit = request.control
    assert unit is not None
    # Named by its catalogue name: its own preprocessor (canny) is filled in at admission.
    assert (unit.controlnet, unit.preprocessor, unit.end) == ("edges", "canny", 0.5)
    assert same_picture(unit.image, sent)
    assert request.height > request.width  # a portrait picture, a portrait result


async def test_discord_control_without_an_image_is_refused_privately(
    discord_stack: DiscordStack,
) -> None:
    fake = discord_stack.fake
    inter = await fake.slash(
        ALICE, "imagine", [p.option("prompt", f"a tower {TINY} --control scribble")]
    )
    callback = await fake.wait_for(lambda: inter.callback, 30, "the refusal")
    data = callback.json["data"]
    assert data["flags"] & 64 and "--control needs a picture: attach one" in data["content"]
    assert not discord_stack.jobs()
