"""A process of the chaos campaign (bench/chaos.py starts and kills these): a dispatcher
(``dispatcher NAME RAY_ADDRESS``), the Telegram bot (``bot``) or the Discord bot (``discord``),
settings from ATELIER_*, built by the same assembly as `atelier dispatcher` / `atelier bot
telegram` / `atelier bot discord`, with a dispatcher's
periodic passes shortened so faults are noticed within seconds."""

from __future__ import annotations

import asyncio
import os
import sys

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from atelier.app import run_discord_bot, run_dispatcher, run_telegram_bot
from cluster.dispatcher import Pacing
from core.logs import setup_logging
from core.settings import load_settings

PACING = Pacing(
    read_block_ms=200, progress_interval_s=0.5, refresh_interval_s=1.0, epoch_check_s=0.5,
    reconcile_interval_s=2.0, drain_timeout_s=10.0,
)


def main(argv: list[str]) -> None:
    settings = load_settings()
    setup_logging(settings.log_format, settings.log_level)
    if argv[0] == "dispatcher":
        name, address = argv[1], argv[2]
        asyncio.run(run_dispatcher(settings, name=name, ray_address=address, pacing=PACING))
    elif argv[0] == "bot":
        asyncio.run(run_telegram_bot(settings, poll_timeout=1))
    elif argv[0] == "discord":
        asyncio.run(run_discord_bot(settings))
    else:
        raise SystemExit(f"usage: chaos_proc dispatcher NAME ADDRESS | bot | discord; got {argv}")


if __name__ == "__main__":
    main(sys.argv[1:])
