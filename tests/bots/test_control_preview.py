"""The control map with a ControlNet result, through the real Telegram and Discord bots on their
loopback fakes: the preprocessor's output (the Canny edges of the person's picture, at the size
the model drew) comes first, as a picture of its own, then the images with their buttons; a job
without control shows none."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from core.control import control_map
from testing.discord import payloads as p
from tests.bots.conftest import Stack
from tests.bots.discord_conftest import DiscordStack
from tests.bots.discord_helpers import ALICE, result_of
from tests.bots.test_chat_control import drawing


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def is_the_control_map(sent: bytes, stack: Stack) -> bool:
    """``sent`` shows what the worker gave the ControlNet: the job's unit, preprocessed at the
    job's size (black and white edges, not the picture the person sent)."""
    (job,) = stack.jobs()
    request = stack.request_of(job)
    assert request.control is not None and request.width and request.height
    expected = np.asarray(control_map(request.control, request.width, request.height))
    shown = pixels(sent)
    return bool(shown.shape == expected.shape and (shown == expected).all()
                and set(np.unique(shown)) <= {0, 255} and (shown == 255).any())


async def test_telegram_posts_the_control_map_before_the_images(stack: Stack) -> None:
    fake, user = stack.fake, 1301
    await fake.send_photo(user, drawing(), caption="a castle --steps 2 --control canny")
    await fake.wait_call("sendPhoto", chat=user, n=2)
    preview, result = fake.calls_of("sendPhoto", chat=user)
    assert preview.params["caption"].startswith("Control map (edges): the images below follow "
                                                "the edges of your picture")
    assert "reply_markup" not in preview.params  # the buttons go with the images
    (data,) = preview.files.values()
    assert is_the_control_map(data, stack)
    assert "reply_markup" in result.params and "a castle" in result.params["caption"]
    (image,) = result.files.values()
    assert not is_the_control_map(image, stack)  # the picture made, not the map again


async def test_telegram_shows_no_map_without_control(stack: Stack) -> None:
    fake, user = stack.fake, 1302
    await fake.send_photo(user, drawing(), caption="a castle --steps 2")  # img2img
    # The map would come before the images: the first picture out is the result.
    first = await fake.wait_call("sendPhoto", chat=user)
    assert "reply_markup" in first.params and "a castle" in first.params["caption"]
    assert stack.request_of(stack.jobs()[0]).control is None


async def test_discord_posts_the_control_map_before_the_images(
    discord_stack: DiscordStack,
) -> None:
    fake = discord_stack.fake
    attachment = fake.add_attachment(drawing(64, 96))
    inter = await fake.slash(
        ALICE, "imagine",
        [p.option("prompt", "a tower --steps 2 --control canny"),
         p.option("image", attachment["id"], 11)],
        attachments=[attachment],
    )
    preview = await result_of(discord_stack, inter, 1)
    result = await result_of(discord_stack, inter, 2)
    (file,) = preview.files
    assert file.filename.endswith("-control.png")
    assert is_the_control_map(file.data, discord_stack)
    # Not numbered: the numbers are the images', as the V and U buttons count them.
    assert preview.json["content"].startswith("Control map (edges): ")
    assert not preview.components()
    assert result.components() and result.json["content"].startswith("1. a tower")
    (image,) = result.files
    assert not is_the_control_map(image.data, discord_stack)
