"""bots.common without a platform: the button codec, the throttled status editor, prompt glue
and the delivery loop's retry-after handling over real Redis."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path

import pytest

from bots.common import texts
from bots.common.buttons import MAX_DATA_BYTES, Action, BadButton, button, parse
from bots.common.delivery import DeliveryLoop, RetryLater
from bots.common.logs import MASK, hide_in_logs
from bots.common.prefs import UserPrefs
from bots.common.progress import ProgressEditor
from bots.common.requests import ModelSizes, img2img, parse_prompt, reroll, upscale
from bots.common.state import MemoryState
from cluster.broker_redis import RedisBroker
from cluster.events import EventKind, JobEvent
from core.errors import InsufficientCredits, InvalidRequest, PromptTooLong
from core.flags import command_limit
from core.jobs import DeliveryTarget
from core.settings import Limits


def test_button_data_fits_telegram_and_round_trips() -> None:
    job = str(uuid.uuid4())
    snowflake = 2**63 - 1  # the largest Discord id
    for action in Action:
        data = button(action, snowflake, job, "watercolor-ink")
        assert len(data.encode()) <= MAX_DATA_BYTES
        pressed = parse(data)
        assert (pressed.action, pressed.owner, pressed.job_id) == (action, str(snowflake), job)
        assert pressed.may_press(snowflake) and not pressed.may_press(1)
        assert pressed.may_press(1, anyone=True)
    assert parse(button(Action.upscale, 7, "job-42", 3)).job_id == "job-42"
    assert parse("g").owner is None and parse("g").may_press(5)
    with pytest.raises(BadButton):
        parse("zz:1:2")
    with pytest.raises(ValueError):
        button(Action.restyle, 1, job, "x" * 40)


def test_prompt_glue_uses_defaults_and_the_png_flag() -> None:
    prefs = UserPrefs(aspect="16:9", steps=30, raw=True, style="anime")
    parsed = parse_prompt("a fox --png --seed 3", prefs)
    assert parsed.original and not parsed.explicit_size
    req = parsed.request
    assert (req.width, req.height, req.steps, req.raw, req.styles) == (
        680,
        384,
        30,
        True,
        ("anime",),
    )
    assert parse_prompt("a fox --w 512 --h 512", UserPrefs()).explicit_size
    assert reroll(req.model_copy(update={"seed": 9})).seed is None
    big = upscale(req, b"png", 680, 384, "anime", 1, max_side=1024)
    assert (big.width, big.height, big.count) == (1024, 576, 1)
    with pytest.raises(InvalidRequest):
        upscale(req, b"png", 1024, 576, None, 1, max_side=1024)
    with pytest.raises(InvalidRequest, match="--png|empty"):
        parse_prompt("--png", UserPrefs())


def test_a_chat_text_too_long_is_refused_before_it_is_parsed() -> None:
    # "--png" repeated: stripping the bot's own flag would leave a short prompt, but the
    # raw text is what costs to read, so its length is checked first.
    text = "a fox" + " --png" * 200_000
    limits = Limits(max_prompt_chars=100)
    with pytest.raises(PromptTooLong, match=f"the text is {len(text)} characters; the limit "
                       f"is {command_limit(limits)}"):
        parse_prompt(text, UserPrefs(), limits=limits)
    assert parse_prompt("a fox --png", UserPrefs(), limits=limits).original


def test_error_line_says_what_to_do_and_the_credits_left() -> None:
    line = texts.error_line(InsufficientCredits("this needs 12 credits; you have 10"), 10)
    assert line.startswith("⚠️ This needs 12 credits") and line.endswith("Credits left: 10.")
    assert "\n" not in line and "daily reset" in line


async def test_progress_editor_edits_a_chat_at_most_once_per_interval() -> None:
    editor = ProgressEditor(interval_s=0.3)
    sent: list[tuple[float, str]] = []

    async def send(text: str) -> None:
        sent.append((time.monotonic(), text))

    for step in range(20):
        editor.update("chat", "m1", f"step {step}", send)
        editor.update("chat", "m2", f"other {step}", send)
        await asyncio.sleep(0.02)
    editor.update("chat", "m1", "done", send, final=True)
    editor.update("chat", "m1", "late tick", send)  # after the final one: ignored
    await editor.idle()
    gaps = [b[0] - a[0] for a, b in zip(sent, sent[1:], strict=False)]
    assert all(gap >= 0.28 for gap in gaps)
    assert len(sent) < 10  # 40 updates coalesced
    assert [t for _, t in sent if t in ("done", "late tick")] == ["done"]
    await editor.close()


async def test_delivery_loop_waits_out_retry_after_then_acks_once(redis_url: str) -> None:
    broker = RedisBroker(redis_url, claim_idle_ms=1000)
    calls: list[float] = []

    async def handler(event: JobEvent) -> None:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise RetryLater(0.2)

    loop = DeliveryLoop(broker, "telegram", "t1", handler, MemoryState(), block_ms=100)
    delivery = DeliveryTarget(frontend="telegram", chat_id="1")
    event = JobEvent(EventKind.failed, "job-1", reason="boom", delivery=delivery)
    loop.start()
    try:
        await broker.deliveries.publish_delivery("telegram", event.to_fields())
        await broker.deliveries.publish_delivery("telegram", event.to_fields())  # a duplicate
        for _ in range(50):
            if len(calls) >= 3:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)
    finally:
        await loop.stop()
        await broker.close()
    assert len(calls) == 3 and calls[2] - calls[0] >= 0.4
    leftover = RedisBroker(redis_url, claim_idle_ms=1)
    try:
        stale = await leftover.deliveries.claim_stale_deliveries("telegram", "t2", min_idle_ms=0)
        assert stale == []
    finally:
        await leftover.close()


def test_secrets_are_masked_in_log_messages_and_tracebacks() -> None:
    secret = "424242:never-in-a-log-" + uuid.uuid4().hex
    hide_in_logs(secret)
    logger = logging.getLogger("bots.test.masking")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    logger.addHandler(handler)
    try:
        logger.warning("calling https://api.example/bot%s/getMe", secret)
        try:
            raise RuntimeError(f"refused {secret}")
        except RuntimeError:
            logger.warning("it failed", exc_info=True)
    finally:
        logger.removeHandler(handler)
    text = "\n".join(logging.Formatter().format(r) for r in records)
    assert secret not in text
    assert text.count(MASK) == 2 and "RuntimeError: refused <token>" in text


@pytest.mark.parametrize(("photo", "prompt"), [((280, 210), "as a watercolor"),
                                               ((1280, 960), "as a watercolor"),
                                               ((300, 1200), "a tall one")])
def test_a_photo_is_redrawn_at_a_size_its_model_draws(
    photo: tuple[int, int], prompt: str, tmp_path: Path
) -> None:
    # The shipped demo model draws 128x128 by default and at most 128 a side: a chat photo
    # (280x210 is a Telegram thumbnail) is redrawn within that, in about its shape.
    from cluster.registry import ModelRegistry
    from core.settings import load_settings

    demo = ModelRegistry.load(load_settings(data_dir=tmp_path, _env_file=None)).get("demo")
    sizes = ModelSizes(demo.default_width, demo.default_height, demo.max_width, demo.max_height)
    parsed = parse_prompt(prompt, UserPrefs())
    request = img2img(parsed, b"png", *photo, sizes)
    assert request.width is not None and request.height is not None
    assert request.width <= demo.max_width and request.height <= demo.max_height
    assert (request.width >= request.height) == (photo[0] >= photo[1])
    # Without a model's sizes: as before, about the photo's own area up to 512² (SD 1.5).
    plain = img2img(parsed, b"png", *photo)
    assert plain.width is not None and plain.width > demo.max_width
