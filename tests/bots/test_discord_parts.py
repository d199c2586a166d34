"""The Discord adapter's own small parts: typed options as flags, the server's defaults and
steps cap, images fitted to an upload limit, keyboards as Discord button rows."""

from __future__ import annotations

import io
import os

import pytest
from PIL import Image

from bots.common.buttons import MAX_DATA_BYTES, Action, button
from bots.common.keyboards import Key, results
from bots.discord.cogs.imagine import server_defaults
from bots.discord.components import PREFIX, ChatButton, view_for
from bots.discord.files import fit, fit_all
from bots.discord.guilds import GuildPrefs
from bots.discord.options import Options, command_text
from core.errors import InvalidRequest
from core.flags import parse_command


def noise_png(side: int = 96) -> bytes:
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(out, format="PNG")
    return out.getvalue()


def test_typed_options_become_flags_the_common_parser_reads() -> None:
    text = command_text(
        "a fox", Options(style="anime", aspect="16:9", n=2, seed=3, steps=20, cfg=6.5,
                         negative="blurry, text", model="tiny", strength=0.4)
    )
    request = parse_command(text)
    assert (request.styles, request.count, request.seed, request.steps) == (("anime",), 2, 3, 20)
    assert (request.guidance, request.model, request.strength) == (6.5, "tiny", 0.4)
    assert request.negative == "blurry, text" and request.width > request.height
    with pytest.raises(InvalidRequest, match="negative must not contain '--'"):
        command_text("a fox", Options(negative="x --seed 4"))


def test_server_defaults_add_the_model_and_cap_steps() -> None:
    prefs = GuildPrefs(model="tiny", steps_cap=25)
    assert server_defaults("a fox", prefs) == "a fox --model tiny --steps 25"
    assert server_defaults("a fox --model other --steps 10", prefs).endswith("--steps 10")
    assert "--model tiny" not in server_defaults("a fox --model other", prefs)
    with pytest.raises(InvalidRequest, match="at most 25 steps, got 40"):
        server_defaults("a fox --steps 40", prefs)
    assert server_defaults("a fox", GuildPrefs()) == "a fox"


def test_images_are_fitted_to_the_limit_or_left_out() -> None:
    png = noise_png()
    assert fit(png, "a.png", len(png)) is not None
    smaller = fit(png, "a.png", len(png) - 1)
    assert smaller is not None and smaller.reformatted
    assert smaller.filename.rsplit(".", 1)[1] in ("webp", "jpg") and len(smaller.data) < len(png)
    assert fit(png, "a.png", 100) is None
    fitted, left_out = fit_all([(png, "a.png"), (png, "b.png")], int(len(png) * 1.5))
    assert [i for i, _ in fitted] == [0] and left_out == [1]


async def test_keyboards_become_rows_of_at_most_five_persistent_buttons() -> None:
    keyboard = results("0b8e3e2c-6c4f-4bd4-9a4e-0f1a2b3c4d5e", "123456789012345678", 4)
    view = view_for(keyboard)
    # A rendering only (stopped): discord.py keeps nothing per message; the DynamicItem routes.
    assert view is not None and view.is_finished()
    rows = [[c for c in view.children if c.row == r] for r in range(5)]
    assert [len(r) for r in rows if r] == [3, 4, 4, 4]
    wide = ((Key(str(i), button(Action.reroll, None, None, i)) for i in range(7)),)
    rendered = view_for([tuple(k) for k in wide])
    assert rendered is not None
    assert sorted({c.row for c in rendered.children}) == [0, 1]
    longest = "x" * MAX_DATA_BYTES
    assert len(ChatButton(longest, "L").custom_id) <= 100
    assert ChatButton(longest).custom_id == PREFIX + longest


def test_model_choices_offer_only_the_models_a_worker_can_load() -> None:
    from bots.discord.autocomplete import model_choices

    available = ["tiny", "tiny-xl"]  # what Client.available_models() said; sd15 is not there
    assert [c.value for c in model_choices(available, "")] == ["tiny", "tiny-xl"]
    assert [c.value for c in model_choices(available, "XL")] == ["tiny-xl"]
    assert [c.value for c in model_choices(available, "sd")] == []
    assert [c.value for c in model_choices(available, "", with_default=True)][0] == "default"
