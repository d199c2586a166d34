"""``atelier db prune``: removes settled bookkeeping past its retention (storage/retention.py),
once or every ``ATELIER_RETENTION__EVERY_H`` hours with ``--repeat``."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import typer

from atelier.app import open_store, stop_on_signals_blocking
from atelier.wiring import console, fail, settings_or_exit
from core.errors import AtelierError


def db_prune(
    repeat: bool = typer.Option(
        False, "--repeat", help="keep running, pruning every ATELIER_RETENTION__EVERY_H hours"
    ),
) -> None:
    """Remove settled jobs, ledger rows (rolled up; balances unchanged), reservations, spent
    daily buckets, link codes and ControlNet map previews older than ATELIER_RETENTION__DAYS,
    and rows of images deleted ATELIER_RETENTION__DELETED_IMAGES_DAYS ago. Images live until
    deleted."""
    from cluster.previews import prune_previews
    from storage.blobs import BlobStore
    from storage.retention import prune_all

    settings = settings_or_exit()
    rules = settings.retention
    stop = stop_on_signals_blocking() if repeat else threading.Event()
    try:
        with open_store(settings) as sessions:
            while True:
                report = prune_all(
                    sessions,
                    now=datetime.now(UTC),
                    keep=timedelta(days=rules.days),
                    keep_deleted=timedelta(days=rules.deleted_images_days),
                    batch=rules.batch,
                )
                counts = ", ".join(f"{k} {v}" for k, v in report.model_dump().items())
                console.print(f"pruned {report.total} rows: {counts}")
                previews = prune_previews(BlobStore.from_settings(settings),
                                          before=datetime.now(UTC) - timedelta(days=rules.days))
                console.print(f"pruned {previews} control-map previews")
                if not repeat or stop.wait(rules.every_h * 3600):
                    return
    except AtelierError as exc:
        raise fail(exc) from None
