"""Front ends stay light: importing a bot never imports the Diffusers engine, torch or Ray."""

from __future__ import annotations

import subprocess
import sys


def test_bots_do_not_import_the_engine() -> None:
    code = (
        "import sys, bots.telegram.app, bots.telegram.run, bots.common.requests, "
        "bots.discord.bot, bots.discord.run; "
        "print(sorted(m for m in ('engine', 'torch', 'diffusers', 'ray') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
