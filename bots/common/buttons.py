"""Button ids and a compact codec for their data: Telegram allows 64 bytes of callback data
(Discord 100 characters of custom id), so job uuids travel as 22 base64url characters."""

from __future__ import annotations

import base64
import binascii
import uuid
from dataclasses import dataclass
from enum import StrEnum

MAX_DATA_BYTES = 64  # Telegram's callback_data limit, the tighter of the two platforms
_SEP = ":"
_RAW_JOB = "~"  # marks a job id kept as it is (not a uuid)


class Action(StrEnum):
    """What a button does; the value is its code in the data."""

    reroll = "rr"  # the same request with a new seed
    variation = "v"  # V1-V4: a variation of image n
    upscale = "u"  # U1-U4: image n at twice the size
    pick_style = "st"  # open the style picker for a job
    restyle = "rs"  # re-run a job with one style
    gallery = "g"  # a signed gallery link
    cancel = "x"  # cancel a queued or running job
    cancel_grid = "xg"  # cancel every cell of a grid not done yet (job: its first cell)
    styles_page = "sp"  # /styles: show another page of the picker
    set_style = "ss"  # /styles: make a style the default
    setting = "set"  # /settings: set a personal preference
    group_setting = "gs"  # /settings in a group: admins only
    imagine = "im"  # under a preview of plain text: make it (arg: the draft's id)
    vary_region = "vr"  # image n: a signed link to its mask editor in the gallery


class BadButton(ValueError):
    """Data that is not ours, or from an older version of the bot."""


@dataclass(frozen=True, slots=True)
class Button:
    """A decoded button: the action, who may press it (None: anyone) and its arguments."""

    action: Action
    owner: str | None = None
    job_id: str | None = None
    arg: str = ""

    def may_press(self, user_id: str | int, *, anyone: bool = False) -> bool:
        """True if ``user_id`` may use this button (groups may let anyone press)."""
        return anyone or self.owner is None or self.owner == str(user_id)

    @property
    def index(self) -> int:
        """The 1-based image number of V/U buttons (or a page number), from ``arg``."""
        try:
            return int(self.arg)
        except ValueError:
            raise BadButton(f"button argument {self.arg!r} is not a number") from None

    def encode(self) -> str:
        """The data string; raises ValueError when it would not fit in 64 bytes."""
        parts = [self.action.value, _int36(self.owner), _pack_job(self.job_id), self.arg]
        data = _SEP.join(parts).rstrip(_SEP)
        if len(data.encode()) > MAX_DATA_BYTES:
            raise ValueError(f"button data is {len(data.encode())} bytes, over {MAX_DATA_BYTES}")
        return data


def button(
    action: Action, owner: str | int | None = None, job_id: str | None = None, arg: object = ""
) -> str:
    """Encode a button's data in one call: ``button(Action.upscale, user_id, job_id, 2)``."""
    return Button(action, None if owner is None else str(owner), job_id, str(arg)).encode()


def parse(data: str) -> Button:
    """Decode button data; BadButton if it is not a button of this bot."""
    parts = data.split(_SEP, 3)
    parts += [""] * (4 - len(parts))
    code, owner, job, arg = parts
    try:
        action = Action(code)
    except ValueError:
        raise BadButton(f"unknown button {code!r}") from None
    return Button(action, _unint36(owner), _unpack_job(job), arg)


def _int36(value: str | None) -> str:
    """Platform user ids are decimal integers: base 36 keeps a Discord snowflake to 13 chars."""
    if value is None:
        return ""
    if not value.isdigit():
        raise ValueError(f"owner must be a numeric user id, got {value!r}")
    n, out = int(value), ""
    while True:
        n, r = divmod(n, 36)
        out = "0123456789abcdefghijklmnopqrstuvwxyz"[r] + out
        if n == 0:
            return out


def _unint36(text: str) -> str | None:
    if not text:
        return None
    try:
        return str(int(text, 36))
    except ValueError:
        raise BadButton(f"bad owner {text!r}") from None


def _pack_job(job_id: str | None) -> str:
    if job_id is None:
        return ""
    try:
        parsed = uuid.UUID(job_id)
    except ValueError:
        parsed = None
    if parsed is not None and str(parsed) == job_id:
        return base64.urlsafe_b64encode(parsed.bytes).decode().rstrip("=")
    if _SEP in job_id:
        raise ValueError(f"job id must not contain {_SEP!r}, got {job_id!r}")
    return _RAW_JOB + job_id


def _unpack_job(text: str) -> str | None:
    if not text:
        return None
    if text.startswith(_RAW_JOB):
        return text[1:]
    try:
        return str(uuid.UUID(bytes=base64.urlsafe_b64decode(text + "==")))
    except (binascii.Error, ValueError):
        raise BadButton(f"bad job reference {text!r}") from None
